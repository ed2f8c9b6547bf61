"""The embedded database's process: SecantusDB's own command line, named ``bookshop database`` in ``ps``.

``secantusd-py`` is a console script, which ``ps`` would show as one more ``python`` line; started as
``python -m bookshop.database_process ARGS`` it names itself first. Nothing here runs in the shop's own
processes.

**A planner fix.** SecantusDB's write path (update, delete, and the write half of every ``findAndModify``) picks
its candidate documents with ``Storage._try_index_id_keys``, which gives up on any filter with a top-level
operator (``$and``, ``$or``, ``$expr``) and scans the whole collection. ``findAndModify`` always writes with
``{_id: <the document it found>, $and: [query]}``, so every ``find_one_and_update`` read every document of its
collection (measured: 18 ms of server CPU per order transition over ~600 orders, 578 documents read each).
``plan_operator_filters`` teaches it what mongod does: the plain fields beside the operators (and those of
``$and``'s clauses) choose the index, and the full filter is still applied to each candidate by the caller
(every caller runs ``matches(doc, filter)`` on what comes back), so results are unchanged; only the scan goes.

``BOOKSHOP_DB_PROFILE=PATH`` (a diagnostic, off by default) makes the server count, per command, collection and
filter shape, how many it served, the CPU time of the thread that served them and the documents its full
collection scans read; the table is rewritten to ``PATH.<pid>`` every 2 s. That is how the checkout's database cost
was taken apart (docs/architecture.md).
"""
from __future__ import annotations

import collections
import os
import threading
import time


def _shape(value, depth: int = 0):
    """A filter with its values replaced by their types (``{"_id": str, "n": {"$gte": int}}``)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_shape(v, depth + 1)}" for k, v in value.items()) + "}" if depth < 3 else "{..}"
    if isinstance(value, list):
        return "[" + (_shape(value[0], depth + 1) if value else "") + "]"
    return type(value).__name__


def _plain_fields(filter: dict) -> dict:
    """The fields of ``filter`` (and of its ``$and`` clauses) that are not operators: every document matching
    ``filter`` matches them too."""
    plain = {k: v for k, v in filter.items() if not k.startswith("$")}
    for clause in filter.get("$and") or ():
        if isinstance(clause, dict):
            for k, v in _plain_fields(clause).items():
                plain.setdefault(k, v)
    return plain


def plan_operator_filters() -> None:
    """Let filters with top-level operators use an index on their plain fields (see the module's notes)."""
    from secantus import storage

    original = storage.Storage._try_index_id_keys
    if getattr(original, "bookshop_planner", False):
        return

    def try_index_id_keys(self, db, coll, filter, *, collation=None):
        found = original(self, db, coll, filter, collation=collation)
        if found is None and filter and any(isinstance(k, str) and k.startswith("$") for k in filter):
            plain = _plain_fields(filter)
            if plain:
                found = original(self, db, coll, plain, collation=collation)
        return found

    try_index_id_keys.bookshop_planner = True
    storage.Storage._try_index_id_keys = try_index_id_keys


def install_profile(path: str) -> None:
    from secantus import commands, storage

    path = f"{path}.{os.getpid()}"

    stats: dict[tuple, list] = collections.defaultdict(lambda: [0, 0.0, 0])  # count, cpu s, docs scanned
    local = threading.local()
    lock = threading.Lock()
    dispatch = commands.dispatch
    scan_docs = storage.Storage._scan_docs

    def profiled_dispatch(doc, ctx):
        name = commands.command_name(doc)
        coll = doc.get(name) if isinstance(doc.get(name), str) else ""
        what = doc.get("filter") or doc.get("query") or (doc.get("updates") or doc.get("deletes") or [{}])[0].get("q")
        if name == "aggregate":
            what = [next(iter(stage)) for stage in doc.get("pipeline", [])]
        key = (ctx.db_name, name, coll, _shape(what) if what is not None else "")
        local.scanned = 0
        started = time.thread_time()
        try:
            return dispatch(doc, ctx)
        finally:
            spent = time.thread_time() - started
            with lock:
                entry = stats[key]
                entry[0] += 1
                entry[1] += spent
                entry[2] += getattr(local, "scanned", 0)

    def counted_scan(self, db, coll):
        for row in scan_docs(self, db, coll):
            local.scanned = getattr(local, "scanned", 0) + 1
            yield row

    def dump() -> None:
        while True:
            time.sleep(2)
            with lock:
                rows = sorted(stats.items(), key=lambda kv: -kv[1][1])
            lines = [f"{'cpu_ms':>9} {'count':>7} {'ms/op':>7} {'scanned':>9}  db command collection filter"]
            for (db, name, coll, shape), (count, cpu, scanned) in rows:
                lines.append(f"{cpu * 1000:9.1f} {count:7d} {cpu * 1000 / count:7.2f} {scanned:9d}  "
                             f"{db} {name} {coll} {shape}")
            with open(path + ".tmp", "w") as f:
                f.write("\n".join(lines) + "\n")
            os.replace(path + ".tmp", path)

    commands.dispatch = profiled_dispatch
    storage.Storage._scan_docs = counted_scan
    from secantus import server
    if getattr(server, "dispatch", None) is dispatch:
        server.dispatch = profiled_dispatch
    threading.Thread(target=dump, name="bookshop-db-profile", daemon=True).start()


if __name__ == "__main__":
    import sys

    from secantus.cli import main

    from bookshop.procs import DATABASE_TITLE, set_title

    set_title(DATABASE_TITLE)
    plan_operator_filters()
    if os.environ.get("BOOKSHOP_DB_PROFILE"):
        install_profile(os.environ["BOOKSHOP_DB_PROFILE"])
    sys.exit(main(sys.argv[1:]))

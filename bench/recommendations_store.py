"""The recommendations store's commit alone: the embedded database's CPU per applied event.

    python bench/recommendations_store.py [--batches 300] [--events 17] [--shoppers 1000] [--books 200]

A fresh ``:memory:`` embedded server and one ``CoPurchaseRepo``; ``--batches`` batches of ``--events``
confirmations (one book each, by shoppers and books drawn with a fixed seed), each committed as the
follower does: holdings and lists read, changed in memory, ``commit``. Reported: the database process's CPU
per applied event (from /proc; steadier than wall time on a shared machine) and the wall time. Nothing else
runs on that server (no change stream, no other service), so the figure is the commit's own cost; run it
for two versions of the code, interleaved, to compare them (``git worktree add``).
"""
import _bootstrap  # noqa: F401  (must come first)

import argparse
import asyncio
import os
import random
import sys
import time

from bookshop.embedded_db import EmbeddedDatabase
from bookshop.services import recommendations as rec
from bookshop.storage.mongo import Database
from bookshop.storage.recommendations import CoPurchaseRepo


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(pid: int, uri: str, args) -> dict:
    rng = random.Random(7)
    books = [f"978{n:010d}" for n in range(args.books)]
    db = Database(uri, "bench_recs")
    repo = CoPurchaseRepo(db)

    async def keep():
        return True
    await repo.replace_all("bench", rec.CoPurchases(), rec.StreamState(built=True, last_seq=0), keep)
    state, order = await repo.state(), 0
    cpu, started = cpu_seconds(pid), time.monotonic()
    for _ in range(args.batches):
        changes = []
        for _ in range(args.events):
            order += 1
            changes.append(rec.OrderChange(f"s{rng.randrange(args.shoppers)}", f"{order:024d}", True,
                                           (rng.choice(books),)))
        model = rec.CoPurchases(await repo.holdings_of(sorted({c.user_id for c in changes})))
        deltas = [d for c in changes for d in model.hold(c)]
        model.partners = await repo.partners_of(sorted({d.book for d in deltas}))
        model.count(deltas)
        after = rec.StreamState(built=True, last_seq=state.last_seq + args.events, last_event=str(order))
        if not await repo.commit(state, after, model):
            raise RuntimeError("a commit found the store moved on")
        state = after
    events = args.batches * args.events
    db.close()
    return {"events": events, "db_us_per_event": round((cpu_seconds(pid) - cpu) * 1e6 / events),
            "seconds": round(time.monotonic() - started, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300, help="batches committed (default 300)")
    parser.add_argument("--events", type=int, default=17, help="confirmations per batch (default 17)")
    parser.add_argument("--shoppers", type=int, default=1000, help="distinct customers (default 1000)")
    parser.add_argument("--books", type=int, default=200, help="distinct books (default 200)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    server = EmbeddedDatabase(":memory:")
    uri = server.start()
    try:
        result = asyncio.run(run(server.proc.pid, uri, args))
    finally:
        server.stop()
    print(f"{result['events']} events in {args.batches} batches: database {result['db_us_per_event']} µs CPU per "
          f"event, {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

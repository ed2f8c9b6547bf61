#!/usr/bin/env python
"""Run Bookshop.

    python run.py                              everything: embedded database + seven services
    python run.py --service NAME --port N      one service alone (needs MONGODB_URI, BOOKSHOP_SERVICE_SECRET
                                               and BOOKSHOP_<NAME>_URL for the services it calls)
    python run.py rotate-keys                  start signing with a new key (users database)
    python run.py new-epoch SERVICE            a new history of SERVICE's event stream (catalog, inventory or
                                               orders): the step after restoring its database from a backup
    python run.py loadgen --url URL --users N --duration SECONDS
                                               a mixed shopping load against a running shop, then its
                                               invariants checked (staff: BOOKSHOP_ADMIN_EMAIL/_PASSWORD)
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys


def _coverage() -> None:
    # test runs measure the service processes too (see tox.ini)
    if os.environ.get("COVERAGE_PROCESS_START"):
        try:
            import coverage
        except ImportError:
            return
        coverage.process_startup()


def _freeze_heap() -> None:
    """Once a service is built and listening: what it has made so far (modules, classes, routes, caches'
    shells: most of its heap) lives as long as the process, so move it out of the garbage collector's
    sight, after one last collection of the start-up's garbage. A full collection then walks only what came
    later: about 3 µs of CPU a request less for the book page, 11 µs with span export on (``bench/http.py``'s
    gateways, GC time measured in-process). What is frozen is never collected: a start-up object that became
    garbage later would stay (there is none of note; the start-up's own garbage is collected first)."""
    import gc
    gc.collect()
    gc.freeze()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py", description="Run the Bookshop services.")
    parser.add_argument("command", nargs="?", choices=["rotate-keys", "new-epoch"],
                        help="an admin command instead of serving")
    parser.add_argument("target", nargs="?", help="new-epoch: the service whose event stream starts a new history")
    parser.add_argument("--service", help="run only this service")
    parser.add_argument("--port", help="port for --service (default: BOOKSHOP_PORT_BASE + offset)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    _coverage()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadgen"]:  # a client of a running shop, with options of its own
        from bookshop import loadgen
        return loadgen.main(argv[1:], os.environ.get("BOOKSHOP_ADMIN_EMAIL"), os.environ.get("BOOKSHOP_ADMIN_PASSWORD"))
    args = parse_args(argv)
    from bookshop.logs import setup_logging
    from bookshop.settings import Settings, SettingsError, validate_service

    try:
        settings = Settings.from_env()
        if args.service is not None:
            validate_service(args.service)
            port = settings.port(args.service)
            if args.port is not None:
                if not args.port.isdigit() or not 0 < int(args.port) < 65536:
                    raise SettingsError(f"--port must be a port number, got {args.port!r}")
                port = int(args.port)
            if settings.mongodb_uri is None and args.service != "gateway":
                raise SettingsError("--service needs MONGODB_URI (the all-in-one mode starts its own database)")
            if not settings.service_secret:
                raise SettingsError("--service needs BOOKSHOP_SERVICE_SECRET (shared by the services)")
        elif args.port is not None:
            raise SettingsError("--port goes with --service")
    except SettingsError as exc:
        print(f"bookshop: error: {exc}", file=sys.stderr)
        return 2

    if args.command == "rotate-keys":
        setup_logging("admin", settings.log_level)
        from bookshop.wiring import rotate_keys
        if settings.mongodb_uri is None:
            print("bookshop: error: rotate-keys needs MONGODB_URI", file=sys.stderr)
            return 2
        print(asyncio.run(rotate_keys(settings)))
        return 0

    if args.command == "new-epoch":
        setup_logging("admin", settings.log_level)
        from bookshop.wiring import STREAMS, new_epoch
        if args.target not in STREAMS:
            print(f"bookshop: error: new-epoch needs a service with an event stream: {', '.join(STREAMS[:-1])} "
                  f"or {STREAMS[-1]}", file=sys.stderr)
            return 2
        if settings.mongodb_uri is None:
            print("bookshop: error: new-epoch needs MONGODB_URI", file=sys.stderr)
            return 2
        print(asyncio.run(new_epoch(settings, args.target)))
        return 0

    if args.service is not None:
        setup_logging(args.service, settings.log_level)
        from bookshop.app import serve
        from bookshop.procs import service_title, set_title
        set_title(service_title(args.service, port))  # what ps shows: bookshop orders :8004
        try:
            asyncio.run(serve(args.service, settings, port, ready=_freeze_heap))
        except OSError as exc:
            logging.getLogger("bookshop").error("cannot serve %s on port %d: %s", args.service, port, exc)
            return 1
        return 0

    setup_logging("run", settings.log_level)
    from bookshop.supervisor import AlreadyRunning, Supervisor
    try:
        return Supervisor(settings).run()
    except AlreadyRunning as exc:
        print(f"bookshop: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

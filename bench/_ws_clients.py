"""The client side of bench/ws_fanout.py, run by it as a separate process (not meant to be run by hand).

It opens ``--clients`` aiohttp WebSockets to ``--ws``, subscribes each to the ``inventory`` channel and
checks with one warm-up change that every client receives events; then prints ``READY {...}`` and waits
for ``GO`` on stdin (meanwhile the parent reads the server's memory). On GO it makes ``--events`` stock
changes with POST ``--change-url`` (~``--interval`` apart) and, for each, notes ``time.time()`` when the
answer (the commit) arrives and when each client receives the event carrying the new ``on_hand``. The
change answers and the events arrive in this one process, so the latencies use one clock. Prints
``RESULT {...}`` and exits.
"""
import _bootstrap  # noqa: F401  (must come first: takes bench/ off sys.path)

import argparse
import asyncio
import collections
import json
import sys
import time

import aiohttp

from bench import _common as c


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ws", required=True, help="WebSocket URL")
    parser.add_argument("--origin", required=True, help="Origin header")
    parser.add_argument("--change-url", required=True, help="POST here to change the stock (JSON answer has on_hand)")
    parser.add_argument("--token", default="", help="bearer token for the change")
    parser.add_argument("--isbn", required=True)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.05)
    parser.add_argument("--connect-concurrency", type=int, default=50)
    parser.add_argument("--snapshots", action="store_true", help="every client asks for a snapshot")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds to wait for the last events")
    return parser.parse_args(argv)


class Client:
    """One subscribed WebSocket: when it received each on_hand value of the watched ISBN."""

    def __init__(self, isbn: str, deliveries: collections.Counter):
        self.isbn = isbn
        self.deliveries = deliveries  # on_hand -> how many clients have it, shared by all clients
        self.ws = None
        self.subscribed = asyncio.Event()
        self.seq: int | None = None
        self.received: dict[int, float] = {}

    async def open(self, session, args, after: int | None) -> None:
        self.ws = await session.ws_connect(args.ws, origin=args.origin, autoping=True, max_msg_size=0)
        request = {"op": "subscribe", "channel": "inventory"}
        if after is not None:
            request["after"] = after
        await self.ws.send_str(json.dumps(request))
        asyncio.ensure_future(self.read())
        await asyncio.wait_for(self.subscribed.wait(), 30)

    async def read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            now = time.time()
            frame = json.loads(msg.data)
            kind = frame.get("type")
            if kind == "event" and frame.get("event") == "stock.changed" and frame["data"]["isbn"] == self.isbn:
                on_hand = frame["data"]["on_hand"]
                if on_hand not in self.received:
                    self.received[on_hand] = now
                    self.deliveries[on_hand] += 1
            elif kind == "subscribed":
                self.seq = frame.get("seq")
                self.subscribed.set()


def change(args) -> tuple[int, float]:
    """One stock change, made from a thread: its answer is timed there at once, not when this process's
    event loop (busy reading a thousand sockets) would get round to it."""
    status, body = c.call("POST", args.change_url, {"quantity": 1}, token=args.token or None)
    committed = time.time()
    if status != 200:
        raise RuntimeError(f"stock change answered {status}: {body}")
    return body["on_hand"], committed


async def wait_all(deliveries: collections.Counter, clients: int, on_hands: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(deliveries[v] >= clients for v in on_hands):
            return
        await asyncio.sleep(0.05)


async def main(args) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        deliveries: collections.Counter = collections.Counter()
        clients = [Client(args.isbn, deliveries) for _ in range(args.clients)]
        await clients[0].open(session, args, None)  # the first asks for a snapshot; the rest resume after it
        after = None if args.snapshots else clients[0].seq
        sem = asyncio.Semaphore(args.connect_concurrency)

        async def open_one(cl: Client) -> None:
            async with sem:
                await cl.open(session, args, after)
        await asyncio.gather(*(open_one(cl) for cl in clients[1:]))
        connect_s = time.monotonic() - started

        on_hand, _ = await loop.run_in_executor(None, change, args)  # warm-up: every client must see it
        await wait_all(deliveries, len(clients), [on_hand], 30)
        live = sum(on_hand in cl.received for cl in clients)
        print("READY " + json.dumps({"clients": len(clients), "live": live, "connect_s": round(connect_s, 2)}),
              flush=True)

        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "GO":
            return
        commits: dict[int, float] = {}
        began, cpu_began = time.monotonic(), time.process_time()
        for i in range(args.events):
            on_hand, committed = await loop.run_in_executor(None, change, args)
            commits[on_hand] = committed
            await asyncio.sleep(max(0.0, began + (i + 1) * args.interval - time.monotonic()))
        await wait_all(deliveries, len(clients), list(commits), args.grace)
        cpu_ms = (time.process_time() - cpu_began) * 1000

        latencies, missing = [], 0
        for cl in clients:
            for value, committed in commits.items():
                if value in cl.received:
                    latencies.append((cl.received[value] - committed) * 1000)
                else:
                    missing += 1
        early = sum(1 for v in latencies if v < 0)  # the event beat the HTTP answer here
        result = {"clients": len(clients), "events": len(commits), "deliveries": len(latencies),
                  "missing": missing, "early": early, "client_cpu_ms_per_event": round(cpu_ms / len(commits), 2),
                  "latency_ms": c.spread(latencies)}
        print("RESULT " + json.dumps(result), flush=True)
        for cl in clients:
            await cl.ws.close()


if __name__ == "__main__":
    asyncio.run(main(parse_args(sys.argv[1:])))

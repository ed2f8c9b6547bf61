"""The baseline server: a bare Tornado application, nothing of Bookshop in it.

    python bench/bare_server.py --port N

``GET /json`` answers ``{"ok": true}``: the cheapest JSON handler Tornado can serve, against which the
Bookshop routes are measured. With ``--document FILE``, ``GET /doc`` answers that file's bytes as JSON (the
same document a Bookshop route serves, so that only the work around it differs). ``GET /healthz`` gives
the pid. ``/ws`` and ``POST /broadcast`` are the WebSocket fan-out baseline: a client subscribes with
``{"op": "subscribe", ...}``, and each broadcast answers ``{"on_hand": N}`` and then sends every client an
event frame shaped like Bookshop's ``stock.changed`` (so clients parse the same bytes), straight from a set of
handlers with no queue.
"""
import _bootstrap  # noqa: F401  (must come first: takes bench/ off sys.path)

import argparse
import asyncio
import datetime
import json
import os
import signal

import tornado.httpserver
import tornado.ioloop
import tornado.web
import tornado.websocket


class JsonHandler(tornado.web.RequestHandler):
    def get(self):
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(b'{"ok": true}')


class DocumentHandler(tornado.web.RequestHandler):
    def initialize(self, document: bytes):
        self.document = document

    def get(self):
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(self.document)


class HealthHandler(tornado.web.RequestHandler):
    def get(self):
        self.finish({"status": "ok", "pid": os.getpid()})


class Hub:
    def __init__(self):
        self.sockets: set = set()
        self.seq = 0
        self.on_hand = 0


class SocketHandler(tornado.websocket.WebSocketHandler):
    def initialize(self, hub: Hub):
        self.hub = hub

    def check_origin(self, origin):
        return True

    def open(self):
        self.hub.sockets.add(self)

    def on_message(self, message):
        msg = json.loads(message)
        if msg.get("op") == "subscribe":
            self.write_message(json.dumps({"type": "subscribed", "channel": msg.get("channel"),
                                           "seq": self.hub.seq}))

    def on_close(self):
        self.hub.sockets.discard(self)


class BroadcastHandler(tornado.web.RequestHandler):
    def initialize(self, hub: Hub):
        self.hub = hub

    def post(self):
        hub = self.hub
        hub.seq += 1
        hub.on_hand += 1
        at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        frame = json.dumps({"type": "event", "channel": "inventory", "seq": hub.seq, "event": "stock.changed",
                            "data": {"isbn": self.get_query_argument("isbn", "0"), "on_hand": hub.on_hand,
                                     "reserved": 0, "available": hub.on_hand}, "at": at},
                           separators=(",", ":"))
        self.finish({"isbn": self.get_query_argument("isbn", "0"), "on_hand": hub.on_hand})
        # like Bookshop, the event goes out after the "commit" answered
        tornado.ioloop.IOLoop.current().add_callback(self._send, frame)

    def _send(self, frame: str) -> None:
        for sock in list(self.hub.sockets):
            try:
                sock.write_message(frame)
            except tornado.websocket.WebSocketClosedError:
                pass


async def main(port: int, ping_interval: float, document: bytes) -> None:
    hub = Hub()
    settings = {"websocket_max_message_size": 64 * 1024}
    if ping_interval:
        settings.update(websocket_ping_interval=ping_interval, websocket_ping_timeout=ping_interval * 1.5)
    app = tornado.web.Application([
        ("/doc", DocumentHandler, {"document": document}),
        ("/json", JsonHandler),
        ("/healthz", HealthHandler),
        ("/ws", SocketHandler, {"hub": hub}),
        ("/broadcast", BroadcastHandler, {"hub": hub}),
    ], **settings)
    server = tornado.httpserver.HTTPServer(app)
    server.listen(port, address="127.0.0.1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ping-interval", type=float, default=0.0,
                        help="WebSocket keep-alive pings every N s, as the gateway does (default: none)")
    parser.add_argument("--document", help="a file whose bytes GET /doc answers")
    args = parser.parse_args()
    document = b"{}"
    if args.document:
        with open(args.document, "rb") as fh:
            document = fh.read()
    asyncio.run(main(args.port, args.ping_interval, document))

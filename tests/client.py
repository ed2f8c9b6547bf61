"""A small async API client for tests (aiohttp, created inside each test's loop)."""
from __future__ import annotations

import asyncio
import io
import itertools
import json
import uuid

import aiohttp

from harness import ADMIN_EMAIL, ADMIN_PASSWORD

from bookshop.services.isbn import isbn13_check_digit

CARD = {"card_number": "4242424242424242", "exp_month": 12, "exp_year": 2035, "cvc": "123"}
ADDRESS = {"name": "Ann Reader", "line1": "1 Book Street", "city": "Lyon", "postal_code": "69001", "country": "FR"}
_isbn_counter = itertools.count(1)


def isbn13(first12: str) -> str:
    """The ISBN-13 of these 12 digits (the one check-digit helper: the product's, tested in test_isbn.py)."""
    return first12 + isbn13_check_digit(first12)


def fresh_isbn(prefix: str = "979") -> str:
    """A new valid ISBN-13 for each call (unique within a run), its first digits ``prefix``."""
    return isbn13(prefix + f"{uuid.uuid4().int % 10**12:012d}"[len(prefix):])


def fresh_isbn10() -> tuple[str, str]:
    """A new ISBN-10 written with hyphens, and its ISBN-13 digits."""
    body = f"{uuid.uuid4().int % 10**9:09d}"
    check = (11 - sum(int(d) * (10 - i) for i, d in enumerate(body)) % 11) % 11
    return f"{body[0]}-{body[1:4]}-{body[4:]}-{'X' if check == 10 else check}", isbn13("978" + body)


def new_session(**connector) -> aiohttp.ClientSession:
    """A session with one connection per request: a refusal in ``BaseHandler.prepare()`` (401/404/405) ends
    a keep-alive connection (see test_a_refused_request_keeps_the_connection_alive), and a restarted service
    too. ``connector``: more ``TCPConnector`` options."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, **connector),
                                 timeout=aiohttp.ClientTimeout(total=60))


class Reply:
    def __init__(self, status: int, body, headers):
        self.status = status
        self.body = body
        self.headers = headers

    def __repr__(self):
        return f"<Reply {self.status} {self.body!r}>"


class Api:
    def __init__(self, shop, session: aiohttp.ClientSession, token: str | None = None, base: str | None = None):
        self.shop = shop
        self.session = session
        self.token = token
        self.base = base or shop.api

    def as_(self, token: str | None) -> "Api":
        return Api(self.shop, self.session, token, self.base)

    async def call(self, method: str, path: str, body=None, *, raw: bytes | None = None, headers=None,
                   params=None, token: str | None = "default") -> Reply:
        hdrs = dict(headers or {})
        tok = self.token if token == "default" else token
        if tok:
            hdrs["Authorization"] = f"Bearer {tok}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        if data is not None and len(data) > 512 * 1024:
            data = io.BytesIO(data)  # aiohttp warns about big raw bodies
        url = path if path.startswith("http") else self.base + path
        async with self.session.request(method, url, data=data, headers=hdrs, params=params) as resp:
            text = await resp.read()
            try:
                parsed = json.loads(text) if text else None
            except ValueError:
                parsed = text
            return Reply(resp.status, parsed, resp.headers)

    async def get(self, path, **kw):
        return await self.call("GET", path, **kw)

    async def post(self, path, body=None, **kw):
        return await self.call("POST", path, body, **kw)

    async def put(self, path, body=None, **kw):
        return await self.call("PUT", path, body, **kw)

    async def patch(self, path, body=None, **kw):
        return await self.call("PATCH", path, body, **kw)

    async def delete(self, path, **kw):
        return await self.call("DELETE", path, **kw)

    # -- helpers --------------------------------------------------------------------------------------
    async def register(self, email: str | None = None, password: str = "password-123", name: str = "Reader"):
        email = email or f"reader-{uuid.uuid4().hex[:12]}@example.com"
        r = await self.post("/users", {"email": email, "password": password, "name": name}, token=None)
        assert r.status == 201, r
        return email, password

    async def login(self, email: str, password: str) -> dict:
        r = await self.post("/tokens", {"email": email, "password": password}, token=None)
        assert r.status == 200, r
        return r.body

    async def customer(self) -> "Api":
        email, password = await self.register()
        return self.as_((await self.login(email, password))["access_token"])

    async def service(self, client_id: str = "orders") -> "Api":
        """Signed in as a service (OAuth2 client credentials with the shop's service secret)."""
        form = {"grant_type": "client_credentials", "client_id": client_id,
                "client_secret": self.shop.env["BOOKSHOP_SERVICE_SECRET"]}
        async with self.session.post(self.shop.url("users") + "/oauth/token", data=form) as resp:
            assert resp.status == 200, await resp.text()
            return self.as_((await resp.json())["access_token"])

    async def staff(self) -> "Api":
        return self.as_((await self.login(ADMIN_EMAIL, ADMIN_PASSWORD))["access_token"])

    async def new_book(self, staff: "Api", stock: int = 0, price_cents: int = 1000, **fields) -> str:
        isbn = fresh_isbn()
        book = {"isbn": isbn, "title": fields.pop("title", f"Book {isbn}"),
                "authors": fields.pop("authors", ["Test Author"]), "category": fields.pop("category", "testing"),
                "price_cents": price_cents, "currency": "EUR", **fields}
        r = await staff.post("/books", book)
        assert r.status == 201, r
        if stock:
            r = await staff.post(f"/inventory/{isbn}/restock", {"quantity": stock})
            assert r.status == 200, r
        return isbn

    async def order(self, items, key: str | None = None, card=None, **extra) -> Reply:
        body = {"items": [{"isbn": i, "quantity": q} for i, q in items], "shipping_address": ADDRESS,
                "payment": card or CARD, **extra}
        if not items:
            body.pop("items")
        return await self.post("/orders", body, headers={"Idempotency-Key": key or uuid.uuid4().hex})


# -- the gateway's WebSocket, as a client ---------------------------------------------------------------------
async def levels(api: Api, isbn: str) -> tuple[int, int, int]:
    """A book's stock level (public: read without a token) as (on_hand, reserved, available)."""
    r = await api.get(f"/inventory/{isbn}", token=None)
    assert r.status == 200, r
    assert r.body["available"] == r.body["on_hand"] - r.body["reserved"]
    return r.body["on_hand"], r.body["reserved"], r.body["available"]


async def connect_ws(session: aiohttp.ClientSession, shop, *, url: str | None = None, headers: dict | None = None):
    """A socket to the shop's gateway (or ``url``), from an allowed origin."""
    return await session.ws_connect(url or shop.ws_url, headers={"Origin": shop.origin, **(headers or {})})


async def next_frame(ws, timeout: float = 10.0) -> dict:
    msg = await ws.receive(timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg.type} {msg.data!r}"
    return json.loads(msg.data)


async def read_until(ws, predicate, timeout: float = 15.0) -> list[dict]:
    """Frames up to and including the first one ``predicate`` accepts; fails after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    frames = []
    while True:
        frames.append(await next_frame(ws, max(0.01, deadline - loop.time())))
        if predicate(frames[-1]):
            return frames

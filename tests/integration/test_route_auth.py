"""The route walk: every route of every service needs a token unless the contract makes it public.

The routes come from the real applications: each service is built by ``wiring.build`` (on a database of its
own) and its router's rules are read, so a route added tomorrow, wherever it is added, is walked too. Each
method a handler implements outside its ``public`` set must answer 401 without a token (and with a malformed
one); every public row must answer without one.
"""
from __future__ import annotations

import asyncio
import itertools
import re
import uuid

import pytest
import tornado.web

from client import new_session

from bookshop import SERVICES, wiring
from bookshop.handlers import common
from bookshop.handlers.base import BaseHandler
from bookshop.settings import Settings

ISBN = "9780306406157"
ORDER_ID = "5f0c6a9e2b3d4e5f6a7b8c9d"
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
#: services that keep an event log, and so serve /internal/events (and its WebSocket) to service tokens
EVENT_LOGS = {"catalog", "inventory", "orders"}

#: the public rows: the contract's "anyone" rows and operational routes, per service
CONTRACT_PUBLIC = {
    ("gateway", "/api/v1/users", "POST"),
    ("gateway", "/api/v1/tokens", "POST"),
    ("gateway", "/api/v1/tokens/refresh", "POST"),
    ("gateway", "/api/v1/tokens/revoke", "POST"),
    ("gateway", "/api/v1/books", "GET"),
    ("gateway", "/api/v1/books/([^/]{1,64})", "GET"),
    ("gateway", "/api/v1/inventory/([^/]{1,64})", "GET"),
    ("gateway", "/api/v1/recommendations", "GET"),
    ("gateway", "/api/v1/openapi.json", "GET"),
    ("gateway", "/api/v1/events", "GET"),  # per channel rules: public channels need no token
    ("gateway", "/", "GET"),
    ("users", "/api/v1/users", "POST"),
    ("users", "/api/v1/tokens", "POST"),
    ("users", "/api/v1/tokens/refresh", "POST"),
    ("users", "/api/v1/tokens/revoke", "POST"),
    ("users", "/.well-known/jwks.json", "GET"),
    ("users", "/oauth/token", "POST"),  # OAuth2 client credentials: the secret is in the body
    ("catalog", "/api/v1/books", "GET"),
    ("catalog", "/api/v1/books/([^/]{1,64})", "GET"),
    ("inventory", "/api/v1/inventory/([^/]{1,64})", "GET"),
    ("recommendations", "/api/v1/recommendations", "GET"),
} | {(svc, route, "GET") for svc in SERVICES for route in ("/healthz", "/readyz", "/metrics")}


@pytest.fixture(scope="module")
def routers(mongodb_uri) -> dict[str, list[tuple[str, type, dict]]]:
    """Per service, its application's rules: (the route as its handler knows it, handler, kwargs)."""
    async def build_all():
        settings = Settings(mongodb_uri=mongodb_uri, db_prefix=f"routes_{uuid.uuid4().hex[:8]}", demo_data=False,
                            service_secret="route-walk-" + "s" * 32)
        tables = {}
        for service in SERVICES:
            ctx, app = await wiring.build(service, settings)
            try:
                tables[service] = [(rule.target_kwargs["route"], rule.target, rule.target_kwargs)
                                   for rule in app.wildcard_router.rules]
            finally:
                await ctx.close()
        return tables
    loop = asyncio.new_event_loop()  # its own: the tests' loops come and go with each test
    try:
        return loop.run_until_complete(build_all())
    finally:
        loop.close()


def implemented(handler: type, kwargs: dict) -> list[str]:
    """The methods a route has: the gateway's proxy routes say which (the owner has them), others by code."""
    if "methods" in kwargs:
        return [m for m in METHODS if m in kwargs["methods"]]
    return [m for m in METHODS
            if getattr(handler, m.lower(), None) is not getattr(tornado.web.RequestHandler, m.lower())]


def public_methods(handler: type, kwargs: dict) -> frozenset[str]:
    return frozenset(kwargs.get("public", getattr(handler, "public", frozenset())))


def _value_for(group: str, previous: str) -> list[str]:
    if re.fullmatch(r"[\w-]+(\|[\w-]+)+", group):
        return group.split("|")
    if previous in ("books", "inventory", "items"):
        return [ISBN]
    if previous == "orders":
        return [ORDER_ID]
    if previous == "static":
        return ["dashboard.js"]
    return ["abc123"]


def fill(pattern: str) -> list[str]:
    """Concrete paths for a route pattern, one per alternative of its groups (``(cancel|ship)``)."""
    pieces, choices, at = [], [], 0
    for match in re.finditer(r"\(([^()]*)\)", pattern):
        pieces.append(pattern[at:match.start()])
        previous = pattern[:match.start()].rstrip("/").rsplit("/", 1)[-1]
        choices.append(_value_for(match.group(1), previous))
        at = match.end()
    tail = pattern[at:]
    paths = []
    for combo in itertools.product(*choices):
        paths.append("".join(p + v for p, v in zip(pieces, combo)) + tail)
    for path in paths:
        assert re.fullmatch(pattern, path), (pattern, path)
    return paths


def walk(routers):
    """(service, route, path, method, handler, public?) for every route and implemented method."""
    for service in SERVICES:
        for route, handler, kwargs in routers[service]:
            if not issubclass(handler, BaseHandler) and handler is not common.EventStreamSocket:
                continue  # the dashboard's assets and the live stream, checked on their own below
            public = public_methods(handler, kwargs)
            for path in fill(route):
                for method in implemented(handler, kwargs):
                    yield service, route, path, method, handler, method in public


def test_the_public_routes_in_the_code_are_the_contract_s(routers):
    found = {(svc, route, method) for svc, route, _, method, _, public in walk(routers) if public}
    assert found == CONTRACT_PUBLIC


def test_the_walk_covers_every_service_and_the_internal_api(routers):
    walked = {(svc, route) for svc, route, *_ in walk(routers)}
    assert {svc for svc, _ in walked} == set(SERVICES)
    assert ("orders", "/api/v1/orders/([0-9a-f]{24})/ship") in walked
    assert ("inventory", "/internal/reservations/([A-Za-z0-9_-]{1,64})/(commit|release|put-back)") in walked
    assert ("payments", "/internal/charges") in walked
    assert ("catalog", "/internal/events") in walked
    assert ("orders", "/api/v1/orders/summary") in walked  # added by wiring, not by handlers.orders.routes()
    assert len(walked) >= 45


@pytest.mark.gen_test(timeout=60)
async def test_every_non_public_route_needs_a_token_and_every_public_one_does_not(shop, routers):
    refused, answered = [], []
    async with new_session() as session:
        for service, route, path, method, handler, public in walk(routers):
            url = shop.url(service) + path
            if public:
                params = {"channel": "inventory"} if path == "/api/v1/events" else None
                async with session.request(method, url, json={} if method != "GET" else None,
                                           params=params) as r:
                    await r.read()
                    if r.status in (401, 403) or r.status >= 500:
                        answered.append((service, method, path, r.status))
                continue
            for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic dTpw"}):
                async with session.request(method, url, json={} if method in ("POST", "PUT", "PATCH") else None,
                                           headers=headers) as r:
                    body = await r.json(content_type=None) if r.status == 401 else None
                    if r.status != 401 or not isinstance(body, dict) or "code" not in body.get("error", {}):
                        refused.append((service, method, path, headers.get("Authorization"), r.status))
    assert not refused, f"these answered without a valid token: {refused}"
    assert not answered, f"these public rows did not answer an anonymous caller: {answered}"


@pytest.mark.gen_test(timeout=60)
async def test_a_method_a_route_does_not_have_is_405_before_authentication(shop, routers):
    """Every route of every service, the gateway's proxy routes included: a method the route does not have
    is 405 method_not_allowed, with or without a token (never a 401 that suggests logging in would help)."""
    wrong = []
    async with new_session() as session:
        for service in SERVICES:
            for route, handler, kwargs in routers[service]:
                if not issubclass(handler, BaseHandler):
                    continue
                missing = [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE")
                           if m not in implemented(handler, kwargs)]
                if handler.__name__ == "NotFoundHandler" or not missing:
                    continue
                path = fill(route)[0]
                for method in missing:
                    async with session.request(method, shop.url(service) + path) as r:
                        body = await r.json(content_type=None)
                        if r.status != 405 or body["error"]["code"] != "method_not_allowed":
                            wrong.append((service, method, path, r.status))
    assert not wrong, f"these did not answer 405: {wrong}"


@pytest.mark.gen_test
async def test_the_dashboard_its_assets_and_the_live_stream_are_public(shop):
    async with new_session() as session:
        for path, expected in [("/", 200), ("/static/dashboard.js", 200), ("/static/dashboard.css", 200)]:
            async with session.get(shop.url("gateway") + path) as r:
                assert r.status == expected, path
        async with session.ws_connect(shop.ws_url, headers={"Origin": shop.origin}) as ws:
            await ws.send_json({"op": "subscribe", "channel": "inventory"})
            reply = await ws.receive_json(timeout=10)
            assert reply["type"] in ("subscribed", "snapshot"), reply
        for service in set(SERVICES) - EVENT_LOGS:
            async with session.get(shop.url(service) + "/internal/events") as r:
                assert r.status == 404, service

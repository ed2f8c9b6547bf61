"""Every service: health, readiness, metrics, request ids and the contract's JSON errors."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from bookshop import SERVICES
from bookshop.embedded_db import EmbeddedDatabase
from bookshop.procs import free_port
from client import Api


@pytest.mark.gen_test
async def test_every_service_is_healthy_ready_and_measured(shop):
    async with aiohttp.ClientSession() as session:
        for name in SERVICES:
            async with session.get(shop.url(name) + "/healthz") as r:
                assert r.status == 200
                assert (await r.json())["service"] == name
                assert r.headers["X-Request-ID"]
            async with session.get(shop.url(name) + "/readyz") as r:
                assert r.status == 200
            async with session.get(shop.url(name) + "/metrics") as r:
                text = await r.text()
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                assert 'bookshop_http_requests_total{method="GET",route="/healthz",service="%s",status="200"}' % name \
                    in text
                assert "bookshop_http_request_duration_seconds_bucket" in text


@pytest.mark.gen_test
async def test_request_id_is_echoed_or_created(shop):
    async with aiohttp.ClientSession() as session:
        async with session.get(shop.api + "/books", headers={"X-Request-ID": "trace-me-42"}) as r:
            assert r.headers["X-Request-ID"] == "trace-me-42"
        async with session.get(shop.api + "/books", headers={"X-Request-ID": "bad id with spaces"}) as r:
            assert r.headers["X-Request-ID"] != "bad id with spaces"
            assert len(r.headers["X-Request-ID"]) == 32
        async with session.get(shop.api + "/nothing-here", headers={"X-Request-ID": "abc-1"}) as r:
            assert r.status == 404
            body = await r.json()
            assert body == {"error": {"code": "not_found", "message": "no route for /api/v1/nothing-here",
                                      "request_id": "abc-1"}}
            assert r.headers["X-Request-ID"] == "abc-1"


@pytest.mark.gen_test
async def test_unknown_route_and_method_are_json_on_every_service(shop):
    async with aiohttp.ClientSession() as session:
        for name in SERVICES:
            async with session.get(shop.url(name) + "/no/such/route") as r:
                assert r.status == 404
                assert (await r.json())["error"]["code"] == "not_found"
            async with session.delete(shop.url(name) + "/healthz") as r:
                assert r.status == 405
                assert (await r.json())["error"]["code"] == "method_not_allowed"


@pytest.mark.gen_test
async def test_bad_bodies_are_rejected_with_json_errors(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        r = await api.post("/users", raw=b'{"email": ', token=None)
        assert r.status == 400 and r.body["error"]["code"] == "malformed_json"
        assert r.body["error"]["request_id"] == r.headers["X-Request-ID"]
        r = await api.post("/users", raw=b"x" * (2 * 1024 * 1024), token=None)
        assert r.status == 413 and r.body["error"]["code"] == "payload_too_large"
        assert r.headers["X-Request-ID"]
        r = await api.post("/users", {"email": "a@b.co", "password": "password-1", "name": "A", "admin": True})
        assert r.status == 400 and "admin" in r.body["error"]["message"]
        r = await api.post("/users", {"email": {"$gt": ""}, "password": "password-1", "name": "A"})
        assert r.status == 400 and "email" in r.body["error"]["message"]
        r = await api.post("/users", {"email": "a@b.co", "password": 12345678, "name": "A"})
        assert r.status == 400 and r.body["error"]["message"].startswith("password")
        r = await api.post("/users", [1, 2])
        assert r.status == 400
        r = await api.post("/users", raw=b'{"email": NaN}')
        assert r.status == 400


@pytest.mark.gen_test
async def test_500_never_leaks_a_traceback(shop):
    # a body that is not UTF-8 JSON must not crash into a traceback either
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        r = await api.post("/users", raw=b"\xff\xfe\x00{")
        assert r.status == 400
        assert "Traceback" not in json.dumps(r.body)


@pytest.mark.gen_test(timeout=90)
async def test_database_down_is_503_then_recovers(make_shop):
    port = free_port()
    db = EmbeddedDatabase(":memory:", port=port)
    uri = db.start()
    try:
        shop = make_shop({"MONGODB_URI": uri}, services=["users", "catalog"])
        async with aiohttp.ClientSession() as session:
            db.stop()
            async with session.get(shop.url("catalog") + "/readyz") as r:
                assert r.status == 503
                assert r.headers["Retry-After"]
            async with session.get(shop.api.replace(shop.url("gateway"), shop.url("catalog")) + "/books") as r:
                assert r.status == 503
                body = await r.json()
                assert body["error"]["code"] == "service_unavailable"
                assert r.headers["Retry-After"]
            async with session.get(shop.url("catalog") + "/healthz") as r:
                assert r.status == 200  # alive, just not ready
            db = EmbeddedDatabase(":memory:", port=port)
            db.start()
            for _ in range(100):
                async with session.get(shop.url("catalog") + "/readyz") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.1)
            assert r.status == 200
            async with session.get(shop.url("catalog") + "/api/v1/books") as r:
                assert r.status == 200
    finally:
        db.stop()

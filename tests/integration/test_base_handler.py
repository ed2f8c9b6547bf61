"""The base handler in-process: JSON errors for every failure, request ids, body limits, logging."""
from __future__ import annotations

import io
import json
import logging

import pytest
from harness import ProbeContext, fetch

from bookshop.app import make_app
from bookshop.handlers.base import BaseHandler
from bookshop.logs import JsonFormatter
from bookshop.services import errors
from bookshop.validation import StrictModel


class Echo(StrictModel):
    name: str
    count: int


class BoomHandler(BaseHandler):
    public = {"GET", "POST"}

    def get(self):
        raise RuntimeError("secret internals")

    def post(self):
        body = self.json_body(Echo)
        self.write_json({"name": body.name, "count": body.count})


class ConflictHandler(BaseHandler):
    public = {"GET"}

    def get(self):
        raise errors.OutOfStock(details={"items": [{"isbn": "1"}]})


class PrivateHandler(BaseHandler):
    def get(self):
        self.write_json({"secret": True})


class GuardedHandler(BaseHandler):
    """Public GET, but its own check() refuses: a public request's synchronous fast path must not skip it."""
    public = {"GET"}

    async def check(self) -> None:
        raise errors.Forbidden("closed")

    def get(self):
        self.write_json({"open": True})


class GuardedChild(GuardedHandler):
    pass


class OwnAuthenticateHandler(BaseHandler):
    """Public GET with its own authenticate() (as the account routes read the gateway's relay token): it runs."""
    public = {"GET"}
    relayed = False

    async def authenticate(self) -> None:
        await super().authenticate()
        self.relayed = self.request.headers.get("X-Service-Authorization") == "Bearer relay"

    def get(self):
        self.write_json({"relayed": self.relayed})


@pytest.fixture
def app():
    return make_app(ProbeContext(), [(r"/boom", BoomHandler), (r"/conflict", ConflictHandler),
                                     (r"/private", PrivateHandler), (r"/guarded", GuardedHandler),
                                     (r"/guarded-child", GuardedChild), (r"/own-auth", OwnAuthenticateHandler)])


@pytest.mark.gen_test
async def test_uncaught_exception_is_a_clean_500_logged_with_the_request_id(http_client, base_url):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logging.getLogger("bookshop").addHandler(handler)
    try:
        r = await fetch(http_client, base_url, "/boom", headers={"X-Request-ID": "req-500"})
    finally:
        logging.getLogger("bookshop").removeHandler(handler)
    assert r.code == 500
    body = json.loads(r.body)
    assert body == {"error": {"code": "internal_error", "message": "internal error", "request_id": "req-500"}}
    assert b"secret internals" not in r.body and b"Traceback" not in r.body
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    logged = [entry for entry in lines if entry.get("request_id") == "req-500" and "exc" in entry]
    assert logged and "secret internals" in logged[0]["exc"]


@pytest.mark.gen_test
async def test_domain_errors_map_to_status_and_details(http_client, base_url):
    r = await fetch(http_client, base_url, "/conflict")
    assert r.code == 409
    assert json.loads(r.body)["error"]["code"] == "out_of_stock"
    assert json.loads(r.body)["error"]["details"] == {"items": [{"isbn": "1"}]}


@pytest.mark.gen_test
async def test_strict_validation(http_client, base_url):
    r = await fetch(http_client, base_url, "/boom", method="POST", body=json.dumps({"name": "a", "count": "7"}))
    assert r.code == 400 and json.loads(r.body)["error"]["message"].startswith("count")
    r = await fetch(http_client, base_url, "/boom", method="POST", body=json.dumps({"name": "a", "count": 7}))
    assert r.code == 200 and json.loads(r.body) == {"name": "a", "count": 7}
    r = await fetch(http_client, base_url, "/boom", method="POST",
                    body=json.dumps({"name": {"$ne": ""}, "count": 7}))
    assert r.code == 400 and json.loads(r.body)["error"]["details"]["field"] == "name"


@pytest.mark.gen_test
async def test_chunked_body_over_the_limit_is_413(http_client, base_url):
    chunks = [b"x" * 65536] * 20  # 1.25 MiB without a Content-Length

    async def producer(write):
        for chunk in chunks:
            await write(chunk)
    r = await fetch(http_client, base_url, "/boom", method="POST", body_producer=producer,
                    headers={"Transfer-Encoding": "chunked"})
    assert r.code == 413
    assert json.loads(r.body)["error"]["code"] == "payload_too_large"


@pytest.mark.gen_test
async def test_private_route_needs_a_token_and_service_without_verifier_refuses_tokens(http_client, base_url):
    r = await fetch(http_client, base_url, "/private")
    assert r.code == 401 and json.loads(r.body)["error"]["code"] == "unauthenticated"
    r = await fetch(http_client, base_url, "/private", headers={"Authorization": "Basic abc"})
    assert r.code == 401
    r = await fetch(http_client, base_url, "/private", headers={"Authorization": "Bearer abc"})
    assert r.code == 401


@pytest.mark.gen_test
async def test_every_answer_has_the_standard_headers_errors_included(http_client, base_url):
    # BaseHandler.clear() replaces Tornado's (the Date text made once a second): same headers as before
    import email.utils
    import time
    for path, code in (("/conflict", 409), ("/boom", 500), ("/nowhere", 404)):
        r = await fetch(http_client, base_url, path, headers={"X-Request-ID": "req-h"})
        assert r.code == code
        assert r.headers["Content-Type"] == "application/json; charset=UTF-8"
        assert r.headers["X-Request-ID"] == "req-h" and r.headers["Cache-Control"] == "no-store"
        assert r.headers["Server"].startswith("TornadoServer/")
        assert abs(email.utils.parsedate_to_datetime(r.headers["Date"]).timestamp() - time.time()) < 60


@pytest.mark.gen_test
async def test_public_requests_without_a_token_still_pass_every_check(http_client, base_url):
    # a bodiless public GET with no Authorization is decided in prepare() without a coroutine; anything
    # else (a token, another method, a handler with its own check()) takes the full check()
    r = await fetch(http_client, base_url, "/conflict")
    assert r.code == 409
    r = await fetch(http_client, base_url, "/conflict", headers={"Authorization": "Bearer abc"})
    assert r.code == 401  # a token given is still verified (this service takes none)
    r = await fetch(http_client, base_url, "/conflict", method="DELETE")
    assert r.code == 405
    for path in ("/guarded", "/guarded-child"):
        r = await fetch(http_client, base_url, path)
        assert r.code == 403 and json.loads(r.body)["error"]["code"] == "forbidden"
    r = await fetch(http_client, base_url, "/private")
    assert r.code == 401
    r = await fetch(http_client, base_url, "/own-auth", headers={"X-Service-Authorization": "Bearer relay"})
    assert r.code == 200 and json.loads(r.body) == {"relayed": True}  # its own authenticate() ran

"""Every JSON body is written one way, compact (no spaces after `,` and `:`), errors included: a client that
compares or logs raw bodies sees the same bytes for the same error whichever code path answered it."""
from __future__ import annotations

import json
import urllib.request

import pytest

from harness import http_get


def compact(body: bytes) -> bytes:
    return json.dumps(json.loads(body), separators=(",", ":")).encode()


def post(url: str, data: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize("service,path,status,code", [
    ("gateway", "/api/v1/books/12345", 400, "invalid_field"),       # a domain error (an invalid ISBN)
    ("catalog", "/api/v1/books/12345", 400, "invalid_field"),
    ("gateway", "/api/v1/users/me", 401, "unauthenticated"),
    ("orders", "/api/v1/cart", 401, "unauthenticated"),
    ("gateway", "/no/such/page", 404, "not_found"),                 # tornado's own 404
    ("inventory", "/no/such/page", 404, "not_found"),
])
def test_error_bodies_are_compact_json(shop, service, path, status, code):
    got, body = http_get(shop.url(service) + path, 5)
    assert got == status and json.loads(body)["error"]["code"] == code
    assert body == compact(body)


def test_a_validation_error_with_details_is_compact_too(shop):
    status, body = post(shop.api + "/users", b'{"email": "x@example.com", "password": 7, "name": "X"}')
    assert status == 400 and json.loads(body)["error"]["details"]
    assert body == compact(body)


def test_a_success_body_is_compact(shop):
    status, body = http_get(shop.url("users") + "/healthz", 5)
    assert status == 200 and body == compact(body)

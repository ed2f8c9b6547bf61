"""The base handler's short cuts for requests without a body, in-process: same answers, limits kept."""
from __future__ import annotations

import json

import pytest
from harness import ProbeContext, fetch

from bookshop.app import make_app
from bookshop.handlers.base import BaseHandler


class EchoHandler(BaseHandler):
    public = {"GET", "POST"}

    def get(self):
        self.write_json({"streamed": self._stream_request_body, "body": len(self.body)})

    def post(self):
        self.write_json({"streamed": self._stream_request_body, "body": len(self.body)})


@pytest.fixture
def app():
    return make_app(ProbeContext(), [(r"/echo", EchoHandler)])


@pytest.mark.gen_test
async def test_a_request_without_a_body_is_not_read_as_a_stream(http_client, base_url):
    r = await fetch(http_client, base_url, "/echo", headers={"X-Request-ID": "plain-get"})
    assert r.code == 200 and json.loads(r.body) == {"streamed": False, "body": 0}
    assert r.headers["X-Request-ID"] == "plain-get" and r.headers["Cache-Control"] == "no-store"
    assert r.headers["Content-Type"] == "application/json; charset=UTF-8" and "Etag" not in r.headers
    r = await fetch(http_client, base_url, "/echo", method="POST", body=b"", headers={"Content-Length": "0"})
    assert r.code == 200 and json.loads(r.body) == {"streamed": False, "body": 0}


@pytest.mark.gen_test
async def test_a_request_with_a_body_is_still_streamed_and_limited(http_client, base_url):
    r = await fetch(http_client, base_url, "/echo", method="POST", body=b'{"a": 1}')
    assert r.code == 200 and json.loads(r.body) == {"streamed": True, "body": 8}
    # a GET with a body over the limit: streamed, so answered with the JSON 413
    r = await fetch(http_client, base_url, "/echo", method="GET", body=b"x" * (1024 * 1024 + 1),
                    allow_nonstandard_methods=True)
    assert r.code == 413 and json.loads(r.body)["error"]["code"] == "payload_too_large"

    async def producer(write):
        for _ in range(20):
            await write(b"x" * 65536)
    r = await fetch(http_client, base_url, "/echo", method="POST", body_producer=producer,
                    headers={"Transfer-Encoding": "chunked"})
    assert r.code == 413


@pytest.mark.gen_test
async def test_unknown_paths_and_methods_keep_their_json_errors(http_client, base_url):
    r = await fetch(http_client, base_url, "/nowhere")
    assert r.code == 404 and json.loads(r.body)["error"]["code"] == "not_found"
    r = await fetch(http_client, base_url, "/echo", method="DELETE")
    assert r.code == 405 and json.loads(r.body)["error"]["code"] == "method_not_allowed"

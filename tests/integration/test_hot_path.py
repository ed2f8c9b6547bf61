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


class TaggedHandler(BaseHandler):
    """A handler that does want ETags: Tornado's finish() then computes and checks them, as before."""
    public = {"GET"}

    def compute_etag(self):
        return '"v1"'

    def get(self):
        self.finish(b'{"tagged":true}')


@pytest.fixture
def app():
    return make_app(ProbeContext(), [(r"/echo", EchoHandler), (r"/tagged", TaggedHandler)])


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


@pytest.mark.gen_test
async def test_finish_sets_the_length_and_etags_as_tornado_does(http_client, base_url):
    # BaseHandler.finish() sets a 200's Content-Length itself and check_etag_header() answers False without an
    # Etag: the same answers as Tornado's (no Etag, so If-None-Match never makes a 304)
    for headers in ({}, {"If-None-Match": "*"}, {"If-None-Match": '"abc"'}):
        r = await fetch(http_client, base_url, "/echo", headers=headers)
        assert r.code == 200 and r.body == b'{"streamed":false,"body":0}' and "Etag" not in r.headers
        assert r.headers["Content-Length"] == str(len(r.body))
    r = await fetch(http_client, base_url, "/nowhere")
    assert r.code == 404 and r.headers["Content-Length"] == str(len(r.body))
    # a handler with its own compute_etag() keeps Tornado's ETag and 304
    r = await fetch(http_client, base_url, "/tagged")
    assert r.code == 200 and r.headers["Etag"] == '"v1"' and r.headers["Content-Length"] == str(len(r.body))
    r = await fetch(http_client, base_url, "/tagged", headers={"If-None-Match": '"v1"'})
    assert r.code == 304 and r.body == b""

"""Tracing across the services: one trace per checkout, trace ids in every log line, export by OTEL_* variables.

The shop here runs with ``BOOKSHOP_TEST_SPAN_DIR``: each service also writes its finished spans, one JSON
object a line, to ``<dir>/<service>.jsonl`` (bookshop/tracing.py), which stands in for a collector.
"""
from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import secrets
import subprocess
import sys
import uuid

import aiohttp
import aiohttp.web
import pytest

from client import ADDRESS, CARD, Api
from harness import RUN_PY, Shop, until

HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")
FIVE = ("gateway", "orders", "catalog", "inventory", "payments")


@pytest.fixture(scope="module")
def traced_shop(mongodb_uri, log_dir, tmp_path_factory):
    span_dir = tmp_path_factory.mktemp("spans")
    s = Shop(mongodb_uri, env={"BOOKSHOP_TEST_SPAN_DIR": str(span_dir), "BOOKSHOP_LOG_LEVEL": "INFO"},
             log_dir=log_dir).start()
    s.span_dir = str(span_dir)
    yield s
    s.stop()


def read_spans(shop) -> list[dict]:
    out = []
    for path in glob.glob(os.path.join(shop.span_dir, "*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            out += [json.loads(line) for line in fh if line.endswith("\n")]
    return out


def log_lines(shop, service: str) -> list[dict]:
    out = []
    with open(os.path.join(shop.log_dir, f"{shop.prefix}-{service}.log"), encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass  # a span printed by the console exporter, or a line cut by a test's kill
    return out


def order_body(isbn: str) -> dict:
    return {"items": [{"isbn": isbn, "quantity": 1}], "shipping_address": ADDRESS, "payment": CARD}


def find(spans: list[dict], service: str, kind: str, name: str) -> list[dict]:
    return [s for s in spans if s["service"] == service and s["kind"] == kind and s["name"] == name]


SAGA = [  # (service, kind, name) each checkout's trace must hold
    ("gateway", "SERVER", "POST /api/v1/orders"),
    ("gateway", "CLIENT", "POST orders /api/v1/orders"),
    ("orders", "SERVER", "POST /api/v1/orders"),
    ("orders", "CLIENT", "GET catalog /internal/books"),
    ("catalog", "SERVER", "GET /internal/books"),
    ("orders", "CLIENT", "POST inventory /internal/reservations"),
    ("inventory", "SERVER", "POST /internal/reservations"),
    ("orders", "CLIENT", "POST payments /internal/charges"),
    ("payments", "SERVER", "POST /internal/charges"),
    ("orders", "CLIENT", "POST inventory /internal/reservations/{id}/commit"),
]


def missing_from(spans: list[dict]) -> list[tuple]:
    return [step for step in SAGA if not find(spans, *step)]


@pytest.mark.gen_test(timeout=90)
async def test_one_checkout_is_one_trace_across_five_services_with_the_saga_steps(traced_shop):
    shop = traced_shop
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff, customer = await asyncio.gather(api.staff(), api.customer())
        isbn = await api.new_book(staff, stock=3)
        trace_id, caller_span = secrets.token_hex(16), secrets.token_hex(8)
        r = await customer.post("/orders", order_body(isbn), headers={
            "Idempotency-Key": uuid.uuid4().hex, "traceparent": f"00-{trace_id}-{caller_span}-01"})
        assert r.status == 201, r

    def spans():
        return [s for s in read_spans(shop) if s["trace_id"] == trace_id]
    await until(lambda: not missing_from(spans()), describe=lambda: f"missing {missing_from(spans())}")
    await until(lambda: find(spans(), "orders", "SERVER", "POST /api/v1/orders")
                and find(spans(), "gateway", "SERVER", "POST /api/v1/orders"))
    trace = spans()
    by_id = {s["span_id"]: s for s in trace}
    assert len(by_id) == len(trace), "span ids are unique"
    assert {s["service"] for s in trace} >= set(FIVE)

    # the gateway's span is the child of the caller's; every other span's parent is in this trace
    (root,) = find(trace, "gateway", "SERVER", "POST /api/v1/orders")
    assert root["parent_id"] == caller_span and root["parent_remote"] is True
    for span in trace:
        if span is not root:
            assert span["parent_id"] in by_id, f"{span['service']} {span['name']} has a parent outside the trace"

    def parent(span: dict) -> dict:
        return by_id[span["parent_id"]]

    # a service's server span hangs under the client span of its caller, in the caller's process
    for span in trace:
        if span["kind"] == "SERVER" and span is not root:
            assert parent(span)["kind"] == "CLIENT" and parent(span)["service"] != span["service"], span
    (orders,) = find(trace, "orders", "SERVER", "POST /api/v1/orders")
    assert parent(parent(orders)) is root
    # the saga's steps (run in a task of their own) are children of the orders request's span
    for service, name in [("inventory", "POST /internal/reservations"), ("payments", "POST /internal/charges"),
                          ("catalog", "GET /internal/books")]:
        (server,) = find(trace, service, "SERVER", name)
        assert parent(parent(server)) is orders, f"{service} {name}"
    (commit,) = find(trace, "orders", "CLIENT", "POST inventory /internal/reservations/{id}/commit")
    assert parent(commit) is orders and commit["attributes"]["http.response.status_code"] == 200
    # database commands are spans of the request that sent them, documents left out
    for service in ("orders", "inventory", "payments", "catalog"):
        db = [s for s in trace if s["service"] == service and s["attributes"].get("db.system.name") == "mongodb"]
        assert db, f"no database span in {service}"
        assert all(by_id[s["parent_id"]]["service"] == service for s in db)
    raw = json.dumps(trace)
    assert CARD["card_number"] not in raw and "password" not in raw

    # every one of the five services logged lines of this trace, and every such line names its span
    for service in FIVE:
        lines = [e for e in log_lines(shop, service) if e.get("trace_id") == trace_id]
        assert lines, f"no log line of the trace in {service}"
        assert all(HEX16.match(e["span_id"]) and e.get("request_id") and e["service"] == service for e in lines)
        assert {e["span_id"] for e in lines} <= set(by_id)


@pytest.mark.gen_test(timeout=90)
async def test_a_checkout_without_traceparent_gets_one_trace_id_across_its_log_lines(traced_shop):
    shop = traced_shop
    request_id = "no-trace-" + uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff, customer = await asyncio.gather(api.staff(), api.customer())
        isbn = await api.new_book(staff, stock=3)
        r = await customer.post("/orders", order_body(isbn), headers={
            "Idempotency-Key": uuid.uuid4().hex, "X-Request-ID": request_id})
        assert r.status == 201, r

    def lines():
        return {service: [e for e in log_lines(shop, service) if e.get("request_id") == request_id]
                for service in FIVE}
    await until(lambda: all(lines().values()), describe=lambda: f"lines: { {k: len(v) for k, v in lines().items()} }")
    found = lines()
    trace_ids = {e.get("trace_id") for entries in found.values() for e in entries}
    assert len(trace_ids) == 1, trace_ids
    (trace_id,) = trace_ids
    assert HEX32.match(trace_id)
    # the trace was started by the gateway: its server span is the root
    await until(lambda: [s for s in read_spans(shop) if s["trace_id"] == trace_id and s["parent_id"] is None])
    (root,) = [s for s in read_spans(shop) if s["trace_id"] == trace_id and s["parent_id"] is None]
    assert (root["service"], root["kind"], root["name"]) == ("gateway", "SERVER", "POST /api/v1/orders")


@pytest.mark.gen_test(timeout=90)
async def test_with_export_off_log_lines_still_carry_the_callers_trace(make_shop):
    services = ["users", "catalog", "inventory", "orders", "recommendations", "gateway"]
    shop = make_shop({"BOOKSHOP_LOG_LEVEL": "INFO"}, services=services)
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff, stock=2)
        trace_id = secrets.token_hex(16)
        # the first read of a book page is put together from catalog, inventory and recommendations
        r = await api.get(f"/books/{isbn}", headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
        assert r.status == 200, r
        assert r.headers["X-Request-ID"] == trace_id  # no X-Request-ID given: the trace id is the request id
        # a malformed traceparent is no error: the request starts a trace of its own
        r = await api.get(f"/books/{isbn}", headers={"traceparent": "00-not-a-trace-01"})
        assert r.status == 200 and HEX32.match(r.headers["X-Request-ID"]) and r.headers["X-Request-ID"] != trace_id

    def services_with_trace():
        return {s for s in ("gateway", "catalog", "inventory") if any(
            e.get("trace_id") == trace_id and HEX16.match(e.get("span_id", "")) for e in log_lines(shop, s))}
    await until(lambda: services_with_trace() == {"gateway", "catalog", "inventory"},
                describe=lambda: f"only {services_with_trace()}")


class Collector:
    """A stand-in OpenTelemetry collector: accepts OTLP/HTTP protobuf posts and keeps their spans."""

    def __init__(self):
        self.spans: list[tuple[dict, object]] = []  # (resource attributes, span)
        self.runner = None
        self.port = 0

    async def start(self) -> "Collector":
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                              ExportTraceServiceResponse)

        async def traces(request):
            message = ExportTraceServiceRequest()
            message.ParseFromString(await request.read())
            for resource_spans in message.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    self.spans += [(resource, span) for span in scope.spans]
            return aiohttp.web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                                        content_type="application/x-protobuf")
        app = aiohttp.web.Application()
        app.router.add_post("/v1/traces", traces)
        self.runner = aiohttp.web.AppRunner(app)
        await self.runner.setup()
        site = aiohttp.web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.mark.gen_test(timeout=60)
async def test_spans_go_to_the_otlp_endpoint_and_the_console_when_asked(mongodb_uri, log_dir):
    collector = await Collector().start()
    shop = Shop(mongodb_uri, log_dir=log_dir, env={
        "OTEL_TRACES_EXPORTER": "otlp,console", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test"})
    try:
        await asyncio.to_thread(shop.start, "users")
        trace_id = secrets.token_hex(16)
        async with aiohttp.ClientSession() as session:
            async with session.get(shop.url("users") + "/healthz",
                                   headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}) as resp:
                assert resp.status == 200

        def exported():
            return [(res, s) for res, s in collector.spans if s.trace_id.hex() == trace_id]
        await until(exported, describe=lambda: f"{len(collector.spans)} spans, none of the trace")
        ((resource, span),) = exported()
        assert span.name == "GET /healthz"
        assert resource["service.name"] == "users" and resource["deployment.environment"] == "test"

        def printed():
            with open(os.path.join(log_dir, f"{shop.prefix}-users.log"), encoding="utf-8") as fh:
                return trace_id in fh.read()
        await until(printed)  # the console exporter prints it too
    finally:
        await asyncio.to_thread(shop.stop)
        await collector.stop()


def test_an_unknown_exporter_stops_the_service_with_a_clear_message(mongodb_uri):
    env = {**os.environ, "MONGODB_URI": mongodb_uri, "BOOKSHOP_SERVICE_SECRET": "s", "OTEL_TRACES_EXPORTER": "jaeger"}
    done = subprocess.run([sys.executable, RUN_PY, "--service", "users", "--port", "1"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "OTEL_TRACES_EXPORTER: jaeger is not supported" in done.stderr


@pytest.mark.gen_test(timeout=120)
async def test_a_recovered_checkout_is_a_trace_of_its_own_linked_to_the_first(mongodb_uri, log_dir, tmp_path):
    # the charge takes 3 s: the orders process is killed while its saga waits for it, and the next one recovers
    shop = Shop(mongodb_uri, log_dir=log_dir, env={
        "BOOKSHOP_TEST_SPAN_DIR": str(tmp_path), "BOOKSHOP_SAGA_LEASE": "2", "BOOKSHOP_CHECKOUT_WAIT": "20",
        "BOOKSHOP_PAYMENTS_LATENCY_MS": "3000"})
    shop.span_dir = str(tmp_path)
    try:
        await asyncio.to_thread(shop.start)
        trace_id = secrets.token_hex(16)
        async with aiohttp.ClientSession() as session:
            api = Api(shop, session)
            staff, customer = await asyncio.gather(api.staff(), api.customer())
            isbn = await api.new_book(staff, stock=3)
            checkout = asyncio.ensure_future(customer.post("/orders", order_body(isbn), headers={
                "Idempotency-Key": uuid.uuid4().hex, "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}))

            def reserved():
                return find([s for s in read_spans(shop) if s["trace_id"] == trace_id], "inventory", "SERVER",
                            "POST /internal/reservations")
            await until(reserved)
            await asyncio.to_thread(shop.kill, "orders")
            await asyncio.gather(checkout, return_exceptions=True)  # its connection is gone
            await asyncio.to_thread(shop.start, "orders")

            def recoveries():
                return [s for s in read_spans(shop) if s["name"] == "recover order"
                        and any(link["trace_id"] == trace_id for link in s["links"])]
            await until(recoveries, timeout=60, describe=lambda: "no recovery span linked to the checkout's trace")
        (recovery,) = recoveries()
        assert recovery["service"] == "orders" and recovery["parent_id"] is None
        assert recovery["trace_id"] != trace_id
        # the recovery's calls are in its trace: payments asked about the charge, under the recovery's span
        await until(lambda: find([s for s in read_spans(shop) if s["trace_id"] == recovery["trace_id"]],
                                 "payments", "SERVER", "GET /internal/charges/{id}"))
        trace = {s["span_id"]: s for s in read_spans(shop) if s["trace_id"] == recovery["trace_id"]}
        (status,) = find(list(trace.values()), "payments", "SERVER", "GET /internal/charges/{id}")
        assert trace[status["parent_id"]]["parent_id"] == recovery["span_id"]
    finally:
        await asyncio.to_thread(shop.stop)

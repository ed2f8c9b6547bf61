"""Tracing, log lines and metrics without a server: ids, propagation, exporters' set-up, the span listener."""
from __future__ import annotations

import contextlib
import contextvars
import io
import json
import logging
import re
import types

import pytest
from opentelemetry import trace

from bookshop import tracing
from bookshop.logs import JsonFormatter
from bookshop.metrics import DOMAIN_EVENTS, Metrics
from bookshop.settings import Settings, SettingsError, traces_exporters

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture
def recording(tmp_path):
    """Spans recorded by the SDK into ``<tmp_path>/probe.jsonl`` for one test, then back to ids only."""
    saved = vars(tracing._state).copy()
    tracing.setup("probe", (), env={tracing.TEST_SPAN_DIR: str(tmp_path)})

    def spans() -> list[dict]:
        path = tmp_path / "probe.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    yield spans
    tracing.shutdown()
    vars(tracing._state).update(saved)


def in_context(fn):
    """Run ``fn`` in a context of its own, as each request's handler task is."""
    return contextvars.copy_context().run(fn)


# -- settings ---------------------------------------------------------------------------------------------------
def test_export_is_off_unless_an_exporter_is_named():
    assert traces_exporters({}) == ()
    assert traces_exporters({"OTEL_TRACES_EXPORTER": "none"}) == ()
    assert traces_exporters({"OTEL_TRACES_EXPORTER": "OTLP"}) == ("otlp",)
    assert traces_exporters({"OTEL_TRACES_EXPORTER": "otlp, console,otlp"}) == ("otlp", "console")
    assert traces_exporters({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) == ()
    assert traces_exporters({"OTEL_TRACES_EXPORTER": "otlp",
                             "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) == ("otlp",)
    assert Settings.from_env({"OTEL_TRACES_EXPORTER": "console"}).traces_exporters == ("console",)


@pytest.mark.parametrize("env, message", [
    ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER: jaeger is not supported"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "only http/protobuf"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "only http/protobuf"),
])
def test_unsupported_export_settings_are_refused_at_start_up(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


# -- ids and propagation with export off -------------------------------------------------------------------------
def test_a_request_without_traceparent_starts_a_sampled_trace_and_its_span_is_current():
    def serve():
        span = tracing.start_request({}, "GET", "/x", "/x")
        assert trace.get_current_span() is span
        return span, tracing.current_ids()
    span, ids = in_context(serve)
    assert not span.is_recording()
    ctx = span.get_span_context()
    assert ctx.is_valid and ctx.trace_flags.sampled
    assert ids == (format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"))
    assert tracing.current_ids() is None  # the caller's context is untouched
    other, _ = in_context(serve)
    assert other.get_span_context().trace_id != ctx.trace_id


def test_a_request_started_where_a_span_is_current_is_its_child():
    outer = trace.NonRecordingSpan(trace.SpanContext(int(TRACE, 16), int(PARENT, 16), False,
                                                     trace.TraceFlags(1)))

    def serve():
        with trace.use_span(outer):
            return tracing.start_request({}, "GET", "/x", "/x").get_span_context()
    ctx = in_context(serve)
    assert ctx.trace_id == int(TRACE, 16) and ctx.span_id != int(PARENT, 16)


@pytest.mark.parametrize("flags", ["01", "00"])
def test_a_request_with_traceparent_joins_that_trace_and_passes_it_on(flags):
    def serve():
        span = tracing.start_request({"traceparent": f"00-{TRACE}-{PARENT}-{flags}"}, "POST", "/y", "/y")
        call = tracing.start_call("inventory", "POST", "http://inventory/internal/reservations",
                                  "/internal/reservations")
        headers: dict = {}
        tracing.inject(headers, call)
        return span, call, headers
    span, call, headers = in_context(serve)
    assert format(span.get_span_context().trace_id, "032x") == TRACE
    assert span.get_span_context().span_id != int(PARENT, 16)
    sent = re.match(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$", headers["traceparent"])
    # the same trace, a new span (the call's), the caller's sampling decision unchanged
    assert sent.group(1) == TRACE and sent.group(2) == format(call.get_span_context().span_id, "016x")
    assert sent.group(2) not in (PARENT, format(span.get_span_context().span_id, "016x"))
    assert sent.group(3) == flags


def test_a_malformed_traceparent_starts_a_new_trace():
    span = in_context(lambda: tracing.start_request({"traceparent": f"00-{TRACE}-zz-01"}, "GET", "/", "/"))
    assert span.get_span_context().is_valid and format(span.get_span_context().trace_id, "032x") != TRACE


def test_calls_made_outside_any_request_carry_no_trace():
    span = tracing.start_call("catalog", "GET", "http://catalog/internal/events", "/internal/events")
    headers: dict = {}
    tracing.inject(headers, span)
    assert headers == {} and span is trace.INVALID_SPAN


def test_span_names_have_few_distinct_values():
    assert tracing.path_template("/api/v1/books/9780306406157") == "/api/v1/books/{id}"
    assert tracing.path_template("/internal/reservations/ord_3f9a1c/commit") == \
        "/internal/reservations/{id}/commit"
    assert tracing.route_name("/api/v1/orders/([^/]+)/(cancel|ship)") == "/api/v1/orders/{id}/{cancel|ship}"


# -- log lines --------------------------------------------------------------------------------------------------
def _log_line(fn=lambda: None) -> dict:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("bookshop.test_tracing")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        def log():
            fn()
            logger.warning("served %s", "it")
        in_context(log)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    return json.loads(stream.getvalue())


def test_log_lines_of_a_request_carry_its_trace_and_span_ids():
    entry = _log_line(lambda: tracing.start_request({"traceparent": f"00-{TRACE}-{PARENT}-01"}, "GET", "/", "/"))
    assert entry["trace_id"] == TRACE and re.match(r"^[0-9a-f]{16}$", entry["span_id"])
    assert entry["msg"] == "served it" and entry["level"] == "warning"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", entry["at"])
    assert list(entry) == ["at", "level", "logger", "trace_id", "span_id", "msg"]


def test_log_lines_outside_a_request_have_no_trace_fields():
    entry = _log_line()
    assert "trace_id" not in entry and "span_id" not in entry


# -- recorded spans ---------------------------------------------------------------------------------------------
def test_recorded_spans_keep_their_parents_and_leave_documents_out(recording):
    def serve():
        server = tracing.start_request({"traceparent": f"00-{TRACE}-{PARENT}-01"}, "POST", "/api/v1/orders",
                                       "/api/v1/orders")
        call = tracing.start_call("payments", "POST", "http://payments/internal/charges", "/internal/charges")
        tracing.end_call(call, 503)
        listener = tracing.mongo_listeners()[0]
        command = {"insert": "charges", "documents": [{"card_number": "4242424242424242"}]}
        started = types.SimpleNamespace(command_name="insert", command=command, database_name="shop_payments",
                                        connection_id=("127.0.0.1", 27017), request_id=7)
        listener.started(started)
        listener.succeeded(started)
        tracing.end_request(server, 201)
    in_context(serve)
    spans = {s["name"]: s for s in recording()}
    assert set(spans) == {"POST /api/v1/orders", "POST payments /internal/charges", "insert charges"}
    server = spans["POST /api/v1/orders"]
    assert server["trace_id"] == TRACE and server["parent_id"] == PARENT and server["parent_remote"]
    assert server["kind"] == "SERVER" and server["service"] == "probe"
    assert server["attributes"]["http.response.status_code"] == 201 and server["status"] == "UNSET"
    call = spans["POST payments /internal/charges"]
    assert call["parent_id"] == server["span_id"] and call["status"] == "ERROR"
    db = spans["insert charges"]
    assert db["parent_id"] == server["span_id"] and db["kind"] == "CLIENT"
    assert db["attributes"] == {"db.system.name": "mongodb", "db.namespace": "shop_payments",
                                "db.operation.name": "insert", "db.collection.name": "charges",
                                "server.address": "127.0.0.1", "server.port": 27017}
    assert "4242" not in json.dumps(recording())


def test_a_recorded_request_without_traceparent_starts_a_trace_and_one_under_a_current_span_is_its_child(
        recording):
    # the new trace's span is made in one step (LeanTracer.new_trace): same span as the tracer's start_span
    outer = trace.NonRecordingSpan(trace.SpanContext(int(TRACE, 16), int(PARENT, 16), False,
                                                     trace.TraceFlags(1)))

    def serve(under):
        with trace.use_span(outer) if under else contextlib.nullcontext():
            span = tracing.start_request({}, "GET", "/api/v1/books/([^/]{1,64})", "/api/v1/books/1")
            assert trace.get_current_span() is span and span.is_recording()
            ids = tracing.current_ids()
            tracing.end_request(span, 200)
        return span.get_span_context(), ids
    new, new_ids = in_context(lambda: serve(False))
    child, _ = in_context(lambda: serve(True))
    assert new_ids == (format(new.trace_id, "032x"), format(new.span_id, "016x")) and new.trace_flags.sampled
    spans = {s["span_id"]: s for s in recording()}
    first = spans[format(new.span_id, "016x")]
    assert first["name"] == "GET /api/v1/books/{id}" and first["kind"] == "SERVER" and first["parent_id"] is None
    assert first["attributes"] == {"http.request.method": "GET", "http.route": "/api/v1/books/([^/]{1,64})",
                                   "url.path": "/api/v1/books/1", "http.response.status_code": 200}
    assert child.trace_id == int(TRACE, 16) and spans[format(child.span_id, "016x")]["parent_id"] == PARENT


def test_database_commands_of_background_work_make_no_spans(recording):
    listener = tracing.mongo_listeners()[0]
    event = types.SimpleNamespace(command_name="find", command={"find": "outbox"}, database_name="d",
                                  connection_id=("h", 1), request_id=1)
    listener.started(event)
    listener.succeeded(event)
    assert recording() == []


def test_no_listener_when_spans_are_not_recorded():
    assert tracing.mongo_listeners() == []


def test_a_recovery_trace_is_new_and_linked_to_the_order_s_first_trace(recording):
    remembered = in_context(lambda: (tracing.start_request(
        {"traceparent": f"00-{TRACE}-{PARENT}-01"}, "POST", "/api/v1/orders", "/"), tracing.traceparent())[1])
    assert remembered.startswith(f"00-{TRACE}-")
    with tracing.linked_trace("recover order", remembered, {"order.id": "o1"}) as span:
        assert tracing.current_ids()[0] != TRACE
    (recovery,) = [s for s in recording() if s["name"] == "recover order"]
    assert recovery["parent_id"] is None and recovery["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert recovery["links"] == [{"trace_id": TRACE, "span_id": remembered.split("-")[2]}]


# -- metrics ----------------------------------------------------------------------------------------------------
def test_made_up_http_methods_share_one_series():
    metrics = Metrics("gateway")
    for n in range(50):
        metrics.observe(f"M{n}", "unknown", 405, 0.001)
    metrics.observe("GET", "/healthz", 200, 0.001)
    metrics.observe("GET", "/healthz", 200, 0.001)
    text = metrics.render().decode()
    assert 'bookshop_http_requests_total{method="other",route="unknown",service="gateway",status="405"} 50.0' in text
    assert 'bookshop_http_requests_total{method="GET",route="/healthz",service="gateway",status="200"} 2.0' in text
    assert "M1" not in text and len(metrics._series) == 2


def test_domain_events_are_exported_from_start_up():
    text = Metrics("orders").render().decode()
    for name in DOMAIN_EVENTS["orders"]:
        assert f'bookshop_domain_events_total{{name="{name}",service="orders"}} 0.0' in text


def test_baggage_from_outside_is_not_passed_on(recording):
    def serve():
        tracing.start_request({"traceparent": f"00-{TRACE}-{PARENT}-01", "baggage": "user=attacker,x=" + "y" * 4000},
                              "GET", "/", "/")
        headers: dict = {}
        tracing.inject(headers, tracing.start_call("catalog", "GET", "http://catalog/x", "/x"))
        return headers
    headers = in_context(serve)
    assert set(headers) == {"traceparent"} and TRACE in headers["traceparent"]


def test_hex_ids_are_the_w3c_text_of_the_ids():
    from opentelemetry.trace import SpanContext
    for trace_id, span_id in ((1, 1), (2**128 - 1, 2**64 - 1), (0x4bf92f3577b34da6a3ce929d0e0e4736, 0xf067aa0ba902b7),
                              (2**64, 2**32), (0, 0)):
        expected = (format(trace_id, "032x"), format(span_id, "016x"))
        assert tracing.hex_ids(SpanContext(trace_id, span_id, False)) == expected
    header = {"traceparent": f"00-{TRACE}-{PARENT}-01"}
    ids = in_context(lambda: (tracing.start_request(header, "GET", "/", "/"), tracing.current_ids())[1])
    assert ids[0] == TRACE and re.fullmatch(r"[0-9a-f]{16}", ids[1]) and ids[1] != PARENT

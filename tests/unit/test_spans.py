"""The recording tracer (span export on) behaves as the SDK's does where a service or an exporter can tell:
parent-child ids, sampling decisions, status rules, exceptions, events and links, what the processors see."""
from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SynchronousMultiSpanProcessor, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from bookshop import otlp
from bookshop.spans import LeanSpan, LeanTracer


@pytest.fixture
def recorded():
    memory = InMemorySpanExporter()
    processors = SynchronousMultiSpanProcessor()
    processors.add_span_processor(SimpleSpanProcessor(memory))
    yield memory, processors
    memory.clear()


def tracer_of(processors, sampler=None) -> LeanTracer:
    return LeanTracer(Resource.create({"service.name": "orders"}), processors, sampler)


def remote(sampled: bool) -> trace.Context:
    ctx = SpanContext(0xABC, 0xDEF, True, TraceFlags(1 if sampled else 0))
    return trace.set_span_in_context(NonRecordingSpan(ctx))


def test_a_new_trace_a_child_and_a_remote_parent(recorded):
    memory, processors = recorded
    tracer = tracer_of(processors)
    with tracer.start_as_current_span("root", kind=SpanKind.SERVER, attributes={"a": 1}) as root:
        child = tracer.start_span("child", kind=SpanKind.CLIENT)
        child.end()
    joined = tracer.start_span("joined", remote(True))
    joined.end()
    first, second, third = memory.get_finished_spans()
    assert (first.name, second.name, third.name) == ("child", "root", "joined")
    assert first.context.trace_id == root.get_span_context().trace_id and first.parent.span_id == root.context.span_id
    assert second.parent is None and second.context.trace_flags.sampled and dict(second.attributes) == {"a": 1}
    assert third.context.trace_id == 0xABC and third.parent.is_remote and third.parent.span_id == 0xDEF
    assert all(s.end_time >= s.start_time > 0 for s in (first, second, third))
    assert second.resource.attributes["service.name"] == "orders"


def test_an_unsampled_parent_is_followed_and_a_named_sampler_is_asked(recorded):
    memory, processors = recorded
    dropped = tracer_of(processors).start_span("x", remote(False))
    assert not dropped.is_recording() and not dropped.get_span_context().trace_flags.sampled
    never = tracer_of(processors, sampling.TraceIdRatioBased(0.0)).start_span("y")
    assert not never.is_recording() and never.get_span_context().is_valid
    always = tracer_of(processors, sampling.ALWAYS_ON).start_span("z", remote(False))
    assert isinstance(always, LeanSpan)
    always.end()
    assert [s.name for s in memory.get_finished_spans()] == ["z"]


def test_status_rules_exceptions_events_and_links(recorded):
    memory, processors = recorded
    tracer = tracer_of(processors)
    span = tracer.start_span("s", links=[Link(SpanContext(1, 2, False), {"why": "origin"})])
    span.set_status(StatusCode.ERROR, "bad")
    span.set_status(Status(StatusCode.UNSET))  # never set back to unset
    assert span.status.status_code is StatusCode.ERROR and span.status.description == "bad"
    span.set_status(Status(StatusCode.OK))
    span.set_status(StatusCode.ERROR, "later")  # OK is final
    span.add_event("retry", {"attempt": 2})
    span.update_name("renamed")
    span.end()
    span.set_attribute("after", True)  # ignored once ended
    span.end()  # a second end is no second export
    with pytest.raises(ValueError):
        with tracer.start_as_current_span("failing"):
            raise ValueError("boom")
    done, failing = memory.get_finished_spans()
    assert done.name == "renamed" and done.status.status_code is StatusCode.OK and "after" not in done.attributes
    assert [e.name for e in done.events] == ["retry"] and done.links[0].attributes["why"] == "origin"
    assert failing.status.status_code is StatusCode.ERROR and "ValueError: boom" in failing.status.description
    (event,) = failing.events
    assert event.name == "exception" and event.attributes["exception.type"] == "ValueError"
    assert "boom" in event.attributes["exception.stacktrace"]


def test_the_otlp_bytes_of_lean_spans_are_the_sdks(recorded):
    memory, processors = recorded
    tracer = tracer_of(processors)
    with tracer.start_as_current_span("GET /x", kind=SpanKind.SERVER, attributes={"http.route": "/x"}):
        tracer.start_span("find books", kind=SpanKind.CLIENT, attributes={"db.namespace": "catalog"}).end()
    spans = memory.get_finished_spans()
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    assert ExportTraceServiceRequest.FromString(otlp.Encoder().request(spans)) == encode_spans(spans)


def test_the_sampler_and_limits_come_from_the_standard_variables():
    from bookshop.spans import limits_from, sampler_from
    assert sampler_from({}) is None and sampler_from({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}) is None
    assert sampler_from({"OTEL_TRACES_SAMPLER": "always_off"}) is sampling.ALWAYS_OFF
    ratio = sampler_from({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    assert isinstance(ratio, sampling.ParentBased) and "0.25" in ratio.get_description()
    assert sampler_from({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"}).rate == 1.0
    assert sampler_from({"OTEL_TRACES_SAMPLER": "nonsense"}) is None
    assert limits_from({}) is None
    limits = limits_from({"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "2", "OTEL_SPAN_EVENT_COUNT_LIMIT": "bad"})
    assert limits.max_span_attributes == 2


def test_a_span_limit_set_makes_the_sdk_record_and_apply_it(monkeypatch, tmp_path):
    from bookshop import tracing
    env = {"OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "2", tracing.TEST_SPAN_DIR: str(tmp_path)}
    try:
        tracing.setup("orders", (), env)
        span = tracing._state.tracer.start_span("limited", attributes={"a": 1, "b": 2, "c": 3})
        assert not isinstance(span, LeanSpan) and len(span.attributes) == 2
        span.end()
        tracing.setup("orders", (), {tracing.TEST_SPAN_DIR: str(tmp_path), "OTEL_TRACES_SAMPLER": "always_off"})
        assert not tracing._state.tracer.start_span("dropped").is_recording()
    finally:
        tracing.shutdown()
        tracing.setup("orders", (), {})


def test_the_otlp_bytes_of_lean_spans_with_events_links_status_and_trace_state_are_the_sdks(recorded):
    # the encoder reads a LeanSpan's own fields (its fast path): every field it writes is checked here
    from opentelemetry.trace import TraceState
    memory, processors = recorded
    tracer = tracer_of(processors)
    state = TraceState([("vendor", "v1")])
    parent = trace.set_span_in_context(NonRecordingSpan(SpanContext(0xABC, 0xDEF, True, TraceFlags(1), state)))
    with tracer.start_as_current_span("POST /orders", parent, kind=SpanKind.SERVER,
                                      links=[Link(SpanContext(0x123, 0x456, False, TraceFlags(1)), {"why": "origin"})],
                                      attributes={"http.response.status_code": 503, "url.path": "/orders"}) as span:
        span.add_event("retry", {"attempt": 2})
        span.set_status(Status(StatusCode.ERROR, "upstream down"))
        tracer.start_span("ok", kind=SpanKind.INTERNAL).end()
    spans = memory.get_finished_spans()
    assert all(type(s) is LeanSpan for s in spans) and spans[0].status.status_code is StatusCode.UNSET
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    assert ExportTraceServiceRequest.FromString(otlp.Encoder().request(spans)) == encode_spans(spans)

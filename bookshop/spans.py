"""Recorded spans, while span export is on: lighter than the SDK's own, for the SDK's processors and exporters.

The SDK's ``Span`` costs about 20 µs to start and end here (attribute validation under a lock, a read-only
copy at the end, the sampler's call chain); a ``LeanSpan`` about a quarter of that. It keeps attributes in a
plain dict (the services set only strings and numbers, and apply no attribute, event or link limits) and
hands itself to the processors when it ends. It *is* a ``ReadableSpan``, so ``BatchSpanProcessor``, the
console exporter, the OTLP exporter (``bookshop.otlp``) and test exporters work unchanged. Imported only
when spans are recorded.
"""
from __future__ import annotations

import contextlib
import random
import time
import logging
from typing import Iterator, Mapping

from opentelemetry import trace
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, sampling
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

log = logging.getLogger(__name__)

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)
#: the status of every span not given one (the encoder knows it by identity)
UNSET_STATUS = Status(StatusCode.UNSET)


class LeanSpan(ReadableSpan, trace.Span):
    """A recorded span: the API's ``Span`` for the code that makes it, the SDK's ``ReadableSpan`` for the
    processors and exporters that take it when it ends."""

    def __init__(self, name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind,
                 attributes: dict, links, start_time: int, processor, resource, scope):
        self._name, self._context, self._parent, self._kind = name, context, parent, kind
        self._attributes, self._links, self._events = attributes, tuple(links or ()), []
        self._start_time, self._end_time, self._status = start_time, None, UNSET_STATUS
        self._resource, self._instrumentation_scope, self._instrumentation_info = resource, scope, None
        self._processor = processor

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value) -> None:
        if self._end_time is None:
            self._attributes[key] = value

    def set_attributes(self, attributes) -> None:
        if self._end_time is None:
            self._attributes.update(attributes)

    def add_event(self, name: str, attributes=None, timestamp: int | None = None) -> None:
        if self._end_time is None:
            self._events.append(Event(name, dict(attributes or {}), timestamp or time.time_ns()))

    def add_link(self, context: SpanContext, attributes=None) -> None:
        if self._end_time is None and context.is_valid:
            self._links += (Link(context, attributes),)

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status, description: str | None = None) -> None:
        # as the SDK does: OK is final, UNSET is never set, a description only with an error
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if not isinstance(status, Status):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(self, exception: BaseException, attributes=None, timestamp: int | None = None,
                         escaped: bool = False) -> None:
        import traceback
        self.add_event("exception", {
            "exception.type": type(exception).__qualname__, "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped), **dict(attributes or {})}, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is None:
            self._end_time = end_time or time.time_ns()
            self._processor.on_end(self)


class LeanTracer(trace.Tracer):
    """The tracer while spans are exported: ``LeanSpan``s for the SDK's span processors. The default sampler
    (``parentbased_always_on``) is decided inline; any other named by ``OTEL_TRACES_SAMPLER`` is asked."""

    def __init__(self, resource, processor, sampler=None):
        self._resource, self._processor, self._sampler = resource, processor, sampler
        self._scope = InstrumentationScope("bookshop")

    def start_span(self, name: str, context=None, kind: SpanKind = SpanKind.INTERNAL, attributes=None,
                   links=None, start_time=None, record_exception=True, set_status_on_exception=True) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        if not parent.is_valid:
            parent = None
        trace_id = parent.trace_id if parent is not None else random.getrandbits(128) or 1
        state = parent.trace_state if parent is not None else None
        attributes = dict(attributes) if attributes else {}
        if self._sampler is None:
            sampled = recorded = parent is None or parent.trace_flags.sampled
        else:
            result = self._sampler.should_sample(context, trace_id, name, kind, attributes, links)
            sampled, recorded = result.decision.is_sampled(), result.decision.is_recording()
            state = result.trace_state
            if result.attributes:
                attributes.update(result.attributes)
        ctx = SpanContext(trace_id, random.getrandbits(64) or 1, False, _SAMPLED if sampled else _UNSAMPLED, state)
        if not recorded:
            return NonRecordingSpan(ctx)
        span = LeanSpan(name, ctx, parent, kind, attributes, links, start_time or time.time_ns(), self._processor,
                        self._resource, self._scope)
        self._processor.on_start(span, parent_context=context)
        return span

    def new_trace(self, name: str, kind: SpanKind, attributes: dict) -> LeanSpan:
        """``start_span(name, None, kind, attributes)`` where no span is current, in one step (the server span of
        every request that comes without a trace): the span keeps ``attributes``, a dict of the caller's making.
        Only without a named sampler (``start_span`` asks it; ``tracing.setup`` knows)."""
        ctx = SpanContext(random.getrandbits(128) or 1, random.getrandbits(64) or 1, False, _SAMPLED)
        span = LeanSpan(name, ctx, None, kind, attributes, None, time.time_ns(), self._processor, self._resource,
                        self._scope)
        self._processor.on_start(span, parent_context=None)
        return span

    @contextlib.contextmanager
    def start_as_current_span(self, name: str, context=None, kind: SpanKind = SpanKind.INTERNAL,
                              attributes=None, links=None, start_time=None, record_exception=True,
                              set_status_on_exception=True, end_on_exit=True) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(span, end_on_exit=end_on_exit, record_exception=record_exception,
                            set_status_on_exception=set_status_on_exception):
            yield span


# -- the standard variables the tracer follows --------------------------------------------------------------
_LIMITS = {"OTEL_ATTRIBUTE_COUNT_LIMIT": "max_attributes", "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "max_span_attributes",
           "OTEL_SPAN_EVENT_COUNT_LIMIT": "max_events", "OTEL_SPAN_LINK_COUNT_LIMIT": "max_links",
           "OTEL_EVENT_ATTRIBUTE_COUNT_LIMIT": "max_event_attributes",
           "OTEL_LINK_ATTRIBUTE_COUNT_LIMIT": "max_link_attributes",
           "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "max_attribute_length",
           "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT": "max_span_attribute_length"}


def limits_from(env: Mapping[str, str]) -> SpanLimits | None:
    """The span limits ``env`` sets (``OTEL_*_LIMIT``), or None when it sets none: a ``LeanSpan`` applies no
    limits, so a process given any is traced with the SDK's own spans, which apply them."""
    given = {}
    for name, field in _LIMITS.items():
        value = env.get(name, "").strip()
        if value:
            try:
                given[field] = int(value)
            except ValueError:
                log.warning("%s=%r is not a whole number: ignored", name, value)
    return SpanLimits(**given) if given else None


def sampler_from(env: Mapping[str, str]) -> sampling.Sampler | None:
    """The sampler ``OTEL_TRACES_SAMPLER`` (and ``_ARG``) names, or None for the default
    (``parentbased_always_on``), which ``LeanTracer`` decides inline. As the SDK: an unknown name is the
    default, with a warning; a ratio that is not a number is 1."""
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if name in ("", "parentbased_always_on"):
        return None
    if name in ("traceidratio", "parentbased_traceidratio"):
        try:
            ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", ""))
        except ValueError:
            log.warning("OTEL_TRACES_SAMPLER_ARG is not a number: the ratio is 1")
            ratio = 1.0
        ratio = sampling.TraceIdRatioBased(min(max(ratio, 0.0), 1.0))
        return ratio if name == "traceidratio" else sampling.ParentBased(ratio)
    known = {"always_on": sampling.ALWAYS_ON, "always_off": sampling.ALWAYS_OFF,
             "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF)}
    if name not in known:
        log.warning("OTEL_TRACES_SAMPLER=%r is not a sampler this SDK knows: parentbased_always_on", name)
        return None
    return known[name]

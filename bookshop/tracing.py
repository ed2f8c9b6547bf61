"""OpenTelemetry tracing: one trace per request across the services, spans exported only when asked for.

Every request a service serves gets a server span, made current for the whole of its handling: the JSON log
lines carry its ``trace_id`` and ``span_id``, and every call to a sibling service carries a W3C
``traceparent`` naming it (with a client span of its own). Work a request starts in the background (the
checkout saga's task) inherits the request's context, so it stays in the request's trace. A request without
a ``traceparent`` (or with a malformed one) starts a new trace.

Export is off unless ``OTEL_TRACES_EXPORTER`` names an exporter (the SDK's own default would be ``otlp``):
``otlp`` (OTLP over HTTP/protobuf to ``OTEL_EXPORTER_OTLP_ENDPOINT``), ``console`` (stdout), or both
(``otlp,console``). With export off no span is recorded at all: ``IdsOnlyTracer`` gives each span its ids and
nothing else, which is all that logs and propagation need, at a cost of a few microseconds a request. With
export on, ``bookshop.spans.LeanTracer`` records spans (the SDK's ``ReadableSpan`` interface, at a quarter
of the SDK span's cost) for the SDK's ``BatchSpanProcessor``, which ships them from a thread of its own:
OTLP through ``bookshop.otlp`` (an encoder ten times cheaper than the SDK's, same messages), the console
through the SDK's exporter. The standard variables apply: ``OTEL_EXPORTER_OTLP_*`` and their ``_TRACES_``
forms (endpoint, headers, timeout, compression, certificates; the protocol is always http/protobuf),
``OTEL_BSP_*`` (batching), ``OTEL_TRACES_SAMPLER``/``_ARG``, the ``OTEL_*_LIMIT`` span limits (any of them set
makes the SDK's own spans record, as they apply limits and ``LeanSpan`` does not), ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_PROPAGATORS`` (W3C trace context only by default: no baggage), ``OTEL_SDK_DISABLED``. ``service.name``
is the service's own name (``OTEL_SERVICE_NAME`` would give all seven services one name).

With export on, database commands are child spans too (``MongoSpans``, a pymongo command listener; the
command documents are never attached). Background work with no request behind it (relay, sweeps, followers)
makes no spans.

Tests only: ``BOOKSHOP_TEST_SPAN_DIR`` makes each service also write its finished spans as JSON lines to
``<dir>/<service>.jsonl``, synchronously, so that a test sees a span as soon as it has ended.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import threading
from typing import Any, Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace import (INVALID_SPAN, Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode,
                                 TraceFlags)

from pymongo import monitoring

from bookshop.logs import trace_ids_var

log = logging.getLogger(__name__)

TEST_SPAN_DIR = "BOOKSHOP_TEST_SPAN_DIR"
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SPAN_KEY = trace._SPAN_KEY  # where trace.set_span_in_context puts the span


class IdsOnlyTracer(trace.Tracer):
    """The tracer while export is off: spans that are only their ids (``NonRecordingSpan``).

    A child keeps its parent's trace id, flags and trace state; a new trace is marked sampled, so that a
    service further down that does export records its part. (The SDK with a sampler that drops would clear
    the flag instead, and every service after this one would drop the trace too.)
    """

    def start_span(self, name: str, context=None, kind: SpanKind = SpanKind.INTERNAL, attributes=None,
                   links=None, start_time=None, record_exception=True, set_status_on_exception=True) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        span_id = random.getrandbits(64) or 1
        if parent.is_valid:
            return NonRecordingSpan(SpanContext(parent.trace_id, span_id, False, parent.trace_flags,
                                                parent.trace_state))
        return self.new_trace(name, kind, attributes)

    def new_trace(self, name: str, kind: SpanKind, attributes=None) -> trace.Span:
        """The first span of a new trace (``start_span`` where no span is current), in one step."""
        return NonRecordingSpan(SpanContext(random.getrandbits(128) or 1, random.getrandbits(64) or 1, False,
                                            _SAMPLED))

    @contextlib.contextmanager
    def start_as_current_span(self, name: str, context=None, kind: SpanKind = SpanKind.INTERNAL,
                              attributes=None, links=None, start_time=None, record_exception=True,
                              set_status_on_exception=True, end_on_exit=True) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind)
        with trace.use_span(span, end_on_exit=end_on_exit):
            yield span


class _Tracing:
    """The process's tracing state: which tracer, whether spans are recorded, the provider to flush."""

    def __init__(self):
        self.tracer: trace.Tracer = IdsOnlyTracer()
        self.recording = False
        self.provider = None
        #: the tracer's ``new_trace`` (the first span of a new trace, in one step), None where a sampler decides
        self.new_trace = self.tracer.new_trace
        self.fields: frozenset[str] | None = None  # the propagator's header names, once known


_state = _Tracing()


# -- set-up ---------------------------------------------------------------------------------------------------
def setup(service: str, exporters: tuple[str, ...], env: Mapping[str, str] | None = None) -> None:
    """Configure tracing for this process (once, at service start, after any fork): ``exporters`` as
    ``Settings.traces_exporters`` parsed them from ``OTEL_TRACES_EXPORTER``."""
    env = os.environ if env is None else env
    span_dir = env.get(TEST_SPAN_DIR, "").strip()
    if not env.get("OTEL_PROPAGATORS", "").strip():
        # W3C trace context only (the API's default adds baggage): baggage from outside would be passed on by
        # every service to every other, and none of them reads it
        propagate.set_global_textmap(TraceContextTextMapPropagator())
    _state.fields = None
    if not exporters and not span_dir:
        _state.tracer, _state.recording, _state.provider = IdsOnlyTracer(), False, None
        _state.new_trace = _state.tracer.new_trace
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SynchronousMultiSpanProcessor, TracerProvider, sampling
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from bookshop.spans import LeanTracer, limits_from, sampler_from

    resource = Resource.create({"service.namespace": "bookshop"}).merge(Resource({"service.name": service}))
    processors = SynchronousMultiSpanProcessor()
    sampler, limits = sampler_from(env), limits_from(env)
    # no atexit hook: shutdown() flushes within a bound, where the SDK's own exit hook could wait on a dead
    # collector for the exporter's whole timeout
    provider = TracerProvider(resource=resource, shutdown_on_exit=False, active_span_processor=processors,
                              sampler=sampler or sampling.DEFAULT_ON, span_limits=limits)
    chosen = []  # the processors, in the order they see a span
    if "otlp" in exporters:
        from bookshop import otlp
        chosen.append(BatchSpanProcessor(otlp.SpanExporter(env)))
    if "console" in exporters:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        chosen.append(BatchSpanProcessor(ConsoleSpanExporter()))
    if span_dir:
        os.makedirs(span_dir, exist_ok=True)
        chosen.append(SimpleSpanProcessor(JsonLinesExporter(os.path.join(span_dir, f"{service}.jsonl"))))
    for processor in chosen:
        processors.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    # span limits are the SDK span's business (a LeanSpan applies none)
    # a lone processor is handed the spans straight, without the multi-processor's loop around it
    _state.tracer = provider.get_tracer("bookshop") if limits else LeanTracer(
        resource, chosen[0] if len(chosen) == 1 else processors, sampler)
    _state.recording, _state.provider = True, provider
    _state.new_trace = _state.tracer.new_trace if isinstance(_state.tracer, LeanTracer) and sampler is None else None
    log.info("tracing: exporting spans (%s)", ", ".join(exporters + (("test file",) if span_dir else ())))


def shutdown(timeout: float = 2.0) -> None:
    """Send what is still queued, waiting at most ``timeout`` seconds (at service stop)."""
    provider, _state.provider = _state.provider, None
    if provider is None:
        return
    provider.force_flush(int(timeout * 1000))
    worker = threading.Thread(target=provider.shutdown, daemon=True)  # a dead collector must not hold us
    worker.start()
    worker.join(timeout)


def recording() -> bool:
    """True when spans are recorded and exported (not only their ids)."""
    return _state.recording


# -- requests, calls, background work ----------------------------------------------------------------------
def _propagator_fields() -> frozenset[str]:
    """The headers the propagators read, as given and as Tornado's ``HTTPHeaders`` spells them."""
    fields = _state.fields
    if fields is None:
        names = propagate.get_global_textmap().fields
        fields = _state.fields = frozenset(names) | {"-".join(w.capitalize() for w in n.split("-")) for n in names}
    return fields


def start_request(headers, method: str, route: str, path: str) -> trace.Span:
    """Start the server span of a request and make it current in the caller's context (the handler's task).

    ``headers`` is the request's (any mapping with a case-insensitive ``get``); without trace headers the
    span starts a new trace."""
    parent = None
    if not _propagator_fields().isdisjoint(headers):  # one pass over the header names, no lookups
        parent = propagate.extract(headers)
    if _state.recording:
        name, attributes = f"{method} {route_name(route)}", {
            "http.request.method": method, "http.route": route, "url.path": path}
    else:
        name, attributes = route, None
    if parent is None and _state.new_trace is not None and otel_context.get_value(_SPAN_KEY) is None:
        # a new trace, the common case: made in one step, without the tracer's look-up of a current span and
        # the context copy through set_span_in_context
        span = _state.new_trace(name, SpanKind.SERVER, attributes)
        context = otel_context.set_value(_SPAN_KEY, span)
    else:
        span = _state.tracer.start_span(name, parent, SpanKind.SERVER, attributes)
        context = trace.set_span_in_context(span, parent)
    # never detached: the context belongs to the handler's own task and ends with it
    otel_context.attach(context)
    trace_ids_var.set(hex_ids(span.get_span_context()))
    return span


def end_request(span: trace.Span, status: int) -> None:
    if span.is_recording():  # else there is nothing to end
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()


def start_call(peer: str, method: str, url: str, path: str) -> trace.Span:
    """A client span for one HTTP call to ``peer``, child of the current span (``INVALID_SPAN`` when no
    request is being served: work in the background starts no trace of its own)."""
    current = trace.get_current_span()
    if not current.get_span_context().is_valid:
        return INVALID_SPAN
    if _state.recording:
        return _state.tracer.start_span(f"{method} {peer} {path_template(path)}", None, SpanKind.CLIENT, {
            "http.request.method": method, "peer.service": peer, "url.full": url})
    return _state.tracer.start_span(peer, None, SpanKind.CLIENT)


def end_call(span: trace.Span, status: int | None = None, error: str | None = None) -> None:
    if span.is_recording():
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error is not None or (status is not None and status >= 500):
            span.set_status(Status(StatusCode.ERROR, error))
            if error is not None:
                span.set_attribute("error.type", error)
    span.end()


def inject(headers: dict, span: trace.Span) -> None:
    """Put ``span``'s trace headers (``traceparent``, ...) into ``headers``; nothing for ``INVALID_SPAN``."""
    if span is not INVALID_SPAN:
        propagate.inject(headers, context=trace.set_span_in_context(span))


_GROUP = re.compile(r"\(([^()]*)\)")
_WORDS = re.compile(r"^[\w-]+(\|[\w-]+)+$")
_route_names: dict[str, str] = {}


def route_name(route: str) -> str:
    """A route pattern as a span name shows it: ``/internal/reservations/{id}/{commit|release|put-back}``
    for ``/internal/reservations/([A-Za-z0-9_-]{1,64})/(commit|release|put-back)``."""
    name = _route_names.get(route)
    if name is None:
        name = _route_names[route] = _GROUP.sub(
            lambda m: "{" + m.group(1) + "}" if _WORDS.match(m.group(1)) else "{id}", route)
    return name


def path_template(path: str) -> str:
    """``path`` with its identifier segments (ISBNs, order ids: any segment longer than 3 with a digit)
    replaced by ``{id}``: a span name of few distinct values."""
    return "/".join("{id}" if len(seg) > 3 and any(c.isdigit() for c in seg) else seg for seg in path.split("/"))


def hex_ids(ctx: SpanContext) -> tuple[str, str]:
    """A span's (trace id, span id) as 32 and 16 lowercase hex digits, as W3C trace context writes them
    (``format(id, "032x")``, four times cheaper: every request's log lines carry them)."""
    return ctx.trace_id.to_bytes(16, "big").hex(), ctx.span_id.to_bytes(8, "big").hex()


def current_ids() -> tuple[str, str] | None:
    """The current span's (trace id, span id) as 32 and 16 hex digits, or None outside any trace."""
    ids = trace_ids_var.get()
    if ids is None:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            ids = hex_ids(ctx)
    return ids


def traceparent() -> str | None:
    """The current span as a ``traceparent`` value, to be remembered with work that may be resumed later
    (an order its recovery may pick up)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


@contextlib.contextmanager
def linked_trace(name: str, remembered: str | None, attributes: Mapping[str, Any] | None = None
                 ) -> Iterator[trace.Span]:
    """Run a block as the root span of a new trace, linked to the trace ``remembered`` names (a
    ``traceparent`` saved by ``traceparent()``), e.g. the recovery of an order whose request is gone."""
    links = []
    if remembered:
        origin = trace.get_current_span(propagate.extract({"traceparent": remembered})).get_span_context()
        if origin.is_valid:
            links.append(Link(origin))
    span = _state.tracer.start_span(name, otel_context.Context(), SpanKind.INTERNAL, attributes, links)
    ctx = span.get_span_context()
    token = trace_ids_var.set(hex_ids(ctx))
    try:
        with trace.use_span(span, end_on_exit=True):
            yield span
    finally:
        trace_ids_var.reset(token)


# -- database commands ------------------------------------------------------------------------------------------
def mongo_listeners() -> list:
    """Command listeners for a new motor client: one that makes spans while spans are recorded, else none
    (a listener costs every command a call even when it does nothing)."""
    return [MongoSpans()] if _state.recording else []


class MongoSpans(monitoring.CommandListener):
    """Database commands as client spans, children of the span current where the command was sent (motor
    runs pymongo in threads with a copy of the caller's context). Names and attributes only: the command
    documents (passwords' hashes, keys, orders) are never attached."""

    def __init__(self):
        self._spans: dict[tuple, trace.Span] = {}

    def started(self, event) -> None:
        if not trace.get_current_span().get_span_context().is_valid:
            return  # background work: no trace
        command = event.command_name
        collection = event.command.get(command)
        if not isinstance(collection, str):
            collection = event.command.get("collection") if command == "getMore" else None
        attributes = {"db.system.name": "mongodb", "db.namespace": event.database_name,
                      "db.operation.name": command}
        if isinstance(collection, str):
            attributes["db.collection.name"] = collection
        address = event.connection_id
        if isinstance(address, tuple) and len(address) == 2:
            attributes["server.address"], attributes["server.port"] = str(address[0]), int(address[1])
        name = f"{command} {collection}" if isinstance(collection, str) else command
        self._spans[(event.connection_id, event.request_id)] = _state.tracer.start_span(
            name, None, SpanKind.CLIENT, attributes)

    def succeeded(self, event) -> None:
        span = self._spans.pop((event.connection_id, event.request_id), None)
        if span is not None:
            span.end()

    def failed(self, event) -> None:
        span = self._spans.pop((event.connection_id, event.request_id), None)
        if span is not None:
            code = event.failure.get("codeName") if isinstance(event.failure, dict) else None
            span.set_status(Status(StatusCode.ERROR, code or "command failed"))
            span.end()


# -- the tests' exporter --------------------------------------------------------------------------------------------
def _hex(value: int | None, digits: int) -> str | None:
    return None if value is None else format(value, f"0{digits}x")


class JsonLinesExporter:
    """Tests only (``BOOKSHOP_TEST_SPAN_DIR``): finished spans appended to a file, one JSON object a line.
    (A ``SpanExporter`` by its methods: the SDK is imported only where spans are recorded.)"""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult
        lines = []
        for span in spans:
            ctx, parent = span.get_span_context(), span.parent
            lines.append(json.dumps({
                "name": span.name, "kind": span.kind.name, "service": span.resource.attributes.get("service.name"),
                "trace_id": _hex(ctx.trace_id, 32), "span_id": _hex(ctx.span_id, 16),
                "parent_id": _hex(parent.span_id, 16) if parent is not None else None,
                "parent_remote": bool(parent.is_remote) if parent is not None else None,
                "links": [{"trace_id": _hex(link.context.trace_id, 32), "span_id": _hex(link.context.span_id, 16)}
                          for link in span.links],
                "status": span.status.status_code.name, "attributes": dict(span.attributes or {}),
                "start": span.start_time, "end": span.end_time,
            }, default=str))
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

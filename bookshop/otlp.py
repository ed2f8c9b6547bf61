"""OTLP over HTTP/protobuf for the spans the services record: an encoder that writes the wire format directly,
and the exporter that posts it.

Why not the SDK's own ``OTLPSpanExporter``: it builds a generated protobuf object for every span, attribute and
value before serialising, about 40 µs of CPU per span here, more than the rest of a cached gateway request.
This encoder writes the same messages (the tests parse them with the generated classes and compare them
with the SDK's encoding; ours also carries a link's trace state, which the SDK's leaves out) at a tenth of
that: attribute pairs that repeat (method, route, peer, database names) are encoded once and reused, the
resource and scope once per batch.

The exporter honours the standard variables, traces-specific first:
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (used as is) or ``OTEL_EXPORTER_OTLP_ENDPOINT`` (+ ``/v1/traces``;
default ``http://localhost:4318``), ``..._HEADERS`` (``k=v,k2=v2``, URL-encoded; a ``content-type`` or
``content-encoding`` there is ignored), ``..._TIMEOUT`` (default 10 s; 100 or more is milliseconds as the
specification counts, less is seconds as the Python SDK counts),
``..._COMPRESSION`` (``gzip`` or none), ``..._CERTIFICATE`` (a CA bundle for https) and
``..._CLIENT_CERTIFICATE`` / ``..._CLIENT_KEY``. A post answered 429, 502, 503 or 504 (or not answered) is
retried with exponential backoff (``Retry-After`` respected) until the timeout; any other failure drops the
batch with one warning line (the endpoint without any credentials in it), never the service.
"""
from __future__ import annotations

import base64
import gzip
import http.client
import logging
import os
import random
import struct
import threading
import time
import urllib.parse
from typing import Any, Mapping, Sequence

from bookshop.spans import UNSET_STATUS as _LEAN_UNSET, LeanSpan as _LeanSpan

log = logging.getLogger(__name__)

_SPAN_KIND = {"INTERNAL": 1, "SERVER": 2, "CLIENT": 3, "PRODUCER": 4, "CONSUMER": 5}
_FLAGS_HAS_IS_REMOTE, _FLAGS_IS_REMOTE = 0x100, 0x200
_RETRYABLE = frozenset({429, 502, 503, 504})
_pack_fixed64 = struct.Struct("<Q").pack
_pack_fixed32 = struct.Struct("<I").pack
_pack_double = struct.Struct("<d").pack


# -- the wire format ------------------------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    return _VARINTS[value] if value < _SMALL else _slow_varint(value)


def _slow_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = 4096  # the lengths of most fields and whole spans: looked up, not computed
_VARINTS = tuple(_slow_varint(v) for v in range(_SMALL))


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, bytes, messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _text(number: int, value: str) -> bytes:
    return _field(number, value.encode("utf-8")) if value else b""


def _any_value(value: Any) -> bytes:
    """An ``AnyValue`` message: string 1, bool 2, int 3, double 4, array 5, key-value list 6, bytes 7."""
    if isinstance(value, bool):
        return b"\x10" + (b"\x01" if value else b"\x00")
    if isinstance(value, str):
        return _field(1, value.encode("utf-8"))
    if isinstance(value, int):
        if not -2**63 <= value < 2**63:
            raise ValueError("integer attribute out of the int64 range")
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: negatives as ten-byte two's complement
    if isinstance(value, float):
        return b"\x21" + _pack_double(value)
    if isinstance(value, bytes):
        return _field(7, value)
    if isinstance(value, Mapping):
        return _field(6, b"".join(_field(1, _key_value(str(k), v)) for k, v in value.items()))
    if isinstance(value, Sequence):
        return _field(5, b"".join(_field(1, _any_value(v)) for v in value))
    if value is None:
        return b""
    raise TypeError(f"attribute value of type {type(value).__name__}")


def _key_value(key: str, value: Any) -> bytes:
    return _field(1, key.encode("utf-8")) + _field(2, _any_value(value))


class _Pairs:
    """Encoded ``KeyValue`` fields by (key, value), for the pairs that repeat from span to span. Keys whose
    values are one a request (paths, URLs) are never kept; the rest is bounded, and emptied when full so
    that what repeats now is what it holds."""

    LIMIT = 4096
    UNIQUE = frozenset({"url.path", "url.full", "url.query", "http.target"})

    def __init__(self):
        # per field number: encoded fields of string values and of integer values, by (key, value)
        self._by_number: dict[int, tuple[dict[tuple, bytes], dict[tuple, bytes]]] = {}
        self._keys: dict[tuple[int, str], tuple[bytes, bytes]] = {}  # (number, key): (field tag, key field)

    def _unique_text(self, number: int, key: str, value: str) -> bytes:
        """The field of a string attribute whose value is one a request (``UNIQUE``): made each time, its
        key's part once."""
        head = self._keys.get((number, key))
        if head is None:
            head = self._keys[(number, key)] = (_varint(number << 3 | 2), _field(1, key.encode("utf-8")))
        encoded = value.encode("utf-8")
        any_value = b"\x0a" + _varint(len(encoded)) + encoded
        pair = head[1] + b"\x12" + _varint(len(any_value)) + any_value
        return head[0] + _varint(len(pair)) + pair

    def attributes(self, number: int, attributes: Mapping[str, Any] | None) -> bytes:
        if not attributes:
            return b""
        caches = self._by_number.get(number)
        if caches is None:
            caches = self._by_number[number] = ({}, {})
        texts, ints = caches  # by the (key, value) item itself: no tuple made per attribute
        parts, unique = [], self.UNIQUE
        for item in attributes.items():
            value = item[1]
            kind = type(value)
            if kind is str:  # most of them
                if item[0] in unique:
                    parts.append(self._unique_text(number, item[0], value))
                    continue
                encoded = texts.get(item)
                if encoded is None:
                    encoded = self._keep(texts, item, _field(number, _key_value(item[0], value)))
                parts.append(encoded)
            elif kind is int:  # status codes, ports: a cache of their own, as (k, 1) == (k, True) == (k, 1.0)
                encoded = ints.get(item)
                if encoded is None:
                    encoded = self._encode(number, item[0], value)
                    if encoded is None:
                        continue
                    self._keep(ints, item, encoded)
                parts.append(encoded)
            else:  # bools, floats, bytes, lists, dicts: few, encoded each time
                encoded = self._encode(number, item[0], value)
                if encoded is not None:
                    parts.append(encoded)
        return b"".join(parts)

    def _keep(self, cache: dict, item: tuple, encoded: bytes) -> bytes:
        if len(cache) >= self.LIMIT:
            cache.clear()
        cache[item] = encoded
        return encoded

    @staticmethod
    def _encode(number: int, key: str, value: Any) -> bytes | None:
        try:
            return _field(number, _key_value(key, value))
        except (TypeError, ValueError) as exc:
            log.warning("span attribute %s not exported: %s", key, exc)
            return None


_LOCAL_PARENT = _pack_fixed32(_FLAGS_HAS_IS_REMOTE)
_REMOTE_PARENT = _pack_fixed32(_FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE)
_UNSET_STATUS = b"\x7a\x00"  # field 15, an empty Status: code unset, no message


def _flags(parent) -> bytes:
    return _REMOTE_PARENT if parent is not None and parent.is_remote else _LOCAL_PARENT


def _trace_state(context) -> bytes:
    state = context.trace_state
    return _text(3, ",".join(f"{k}={v}" for k, v in state.items())) if state else b""


class Encoder:
    """Spans (the SDK's ``ReadableSpan`` interface) to an ``ExportTraceServiceRequest``'s bytes."""

    def __init__(self):
        self._pairs = _Pairs()
        self._names: dict[tuple[str, str], bytes] = {}  # a span's name and kind fields, by (name, kind)
        # encoded resources and scopes by id of the (immutable) object, kept alive with it so that the id
        # cannot be reused by another
        self._heads: dict[int, tuple[Any, bytes]] = {}

    def _head(self, obj, encode) -> bytes:
        kept = self._heads.get(id(obj))
        if kept is None or kept[0] is not obj:
            if len(self._heads) > 64:
                self._heads.clear()
            kept = self._heads[id(obj)] = (obj, encode(obj))
        return kept[1]

    def _resource(self, resource) -> bytes:
        return _field(1, self._pairs.attributes(1, resource.attributes)) if resource is not None else b""

    def _scope(self, scope) -> bytes:
        if scope is None:
            return _field(1, b"")
        return _field(1, _text(1, scope.name) + _text(2, scope.version or "")
                      + self._pairs.attributes(3, getattr(scope, "attributes", None)))

    def _named(self, name: str, kind) -> bytes:
        """A span's name and kind fields, by (name, kind): few distinct pairs, encoded once."""
        key = (name, kind)
        named = self._names.get(key)
        if named is None:
            named = _text(5, name) + b"\x30" + _varint(_SPAN_KIND[kind.name])
            if len(self._names) >= _Pairs.LIMIT:
                self._names.clear()
            self._names[key] = named
        return named

    def lean_span(self, span) -> bytes:
        """``span`` for a ``bookshop.spans.LeanSpan``, read from its own fields in one pass: it applies no
        limits (nothing dropped) and most have no events, no links and an unset status, whose fields are
        written without the ``ReadableSpan`` properties' calls."""
        ctx, parent = span._context, span._parent
        out = [b"\x0a\x10", ctx.trace_id.to_bytes(16, "big"), b"\x12\x08", ctx.span_id.to_bytes(8, "big")]
        if ctx.trace_state:
            out.append(_trace_state(ctx))
        if parent is not None:
            out += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
        out += (self._named(span._name, span._kind), b"\x39", _pack_fixed64(span._start_time or 0), b"\x41",
                _pack_fixed64(span._end_time or 0), self._pairs.attributes(9, span._attributes))
        if span._events or span._links:
            out += self._events_links(span)
        out += (_UNSET_STATUS if span._status is _LEAN_UNSET else self._status(span._status),
                b"\x85\x01", _REMOTE_PARENT if parent is not None and parent.is_remote else _LOCAL_PARENT)
        return b"".join(out)

    def _events_links(self, span) -> list[bytes]:
        out, attrs = [], self._pairs.attributes
        for event in span.events:
            body = b"\x09" + _pack_fixed64(event.timestamp or 0) + _text(2, event.name) + attrs(3, event.attributes)
            if event.dropped_attributes:
                body += b"\x20" + _varint(event.dropped_attributes)
            out.append(_field(11, body))
        if span.dropped_events:
            out += (b"\x60", _varint(span.dropped_events))
        for link in span.links:
            lc = link.context
            body = (b"\x0a\x10" + lc.trace_id.to_bytes(16, "big") + b"\x12\x08" + lc.span_id.to_bytes(8, "big")
                    + _trace_state(lc) + attrs(4, link.attributes))
            if link.dropped_attributes:
                body += b"\x28" + _varint(link.dropped_attributes)
            out.append(_field(13, body + b"\x35" + _flags(lc)))
        if span.dropped_links:
            out += (b"\x70", _varint(span.dropped_links))
        return out

    @staticmethod
    def _status(status) -> bytes:
        if status is None:
            return b""
        code = status.status_code.value
        if code or status.description:
            return _field(15, _text(2, status.description or "") + (b"\x18" + _varint(code) if code else b""))
        return _UNSET_STATUS

    def span(self, span) -> bytes:
        """One ``Span`` message (without its field tag), through the ``ReadableSpan`` interface (``request``
        takes a ``LeanSpan`` to ``lean_span`` instead)."""
        ctx, parent, attrs = span.get_span_context(), span.parent, self._pairs.attributes
        out = [b"\x0a\x10", ctx.trace_id.to_bytes(16, "big"), b"\x12\x08", ctx.span_id.to_bytes(8, "big"),
               _trace_state(ctx)]
        if parent is not None:
            out += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
        out += (self._named(span.name, span.kind), b"\x39", _pack_fixed64(span.start_time or 0), b"\x41",
                _pack_fixed64(span.end_time or 0), attrs(9, span.attributes))
        if span.dropped_attributes:
            out += (b"\x50", _varint(span.dropped_attributes))
        out += self._events_links(span)
        out.append(self._status(span.status))
        out += (b"\x85\x01", _flags(parent))
        return b"".join(out)

    def request(self, spans: Sequence) -> bytes:
        """The whole request: spans grouped by resource, then by instrumentation scope, in order met."""
        groups: dict[tuple[int, int], tuple[Any, Any, list[bytes]]] = {}
        lean, encode = self.lean_span, self.span
        for span in spans:
            if type(span) is _LeanSpan:  # its own fields, without the ReadableSpan properties' calls
                resource, scope, body = span._resource, span._instrumentation_scope, lean(span)
            else:
                resource, scope, body = span.resource, span.instrumentation_scope, encode(span)
            group = groups.get((id(resource), id(scope)))
            if group is None:
                group = groups[(id(resource), id(scope))] = (resource, scope, [])
            group[2].extend((b"\x12", _varint(len(body)), body))  # field 2 of ScopeSpans: a Span
        by_resource: dict[int, tuple[Any, list[bytes]]] = {}
        for resource, scope, encoded in groups.values():
            schema = getattr(scope, "schema_url", None) or ""
            scope_spans = _field(2, self._head(scope, self._scope) + b"".join(encoded) + _text(3, schema))
            by_resource.setdefault(id(resource), (resource, []))[1].append(scope_spans)
        out = []
        for resource, scope_spans in by_resource.values():
            body = [self._head(resource, self._resource)] if resource is not None else []
            body += scope_spans
            body.append(_text(3, getattr(resource, "schema_url", "") or ""))
            out.append(_field(1, b"".join(body)))
        return b"".join(out)


# -- the exporter ---------------------------------------------------------------------------------------------
def _env(env: Mapping[str, str], name: str, default: str = "") -> str:
    """``OTEL_EXPORTER_OTLP_TRACES_<name>``, else ``OTEL_EXPORTER_OTLP_<name>``, else ``default``."""
    return (env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}") or default).strip()


def _headers(raw: str) -> dict[str, str]:
    headers = {}
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            headers[urllib.parse.unquote(key.strip()).lower()] = urllib.parse.unquote(value.strip())
    return headers


class SpanExporter:
    """OTLP/HTTP protobuf export (a ``SpanExporter`` by its methods, for the SDK's ``BatchSpanProcessor``),
    on one keep-alive ``http.client`` connection used by the processor's export thread (a ``requests``
    session cost each post about 0.8 ms of CPU more: 1.6 µs a span in a full batch of 512)."""

    def __init__(self, env: Mapping[str, str] | None = None):
        env = os.environ if env is None else env
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        if not endpoint:
            endpoint = _env(env, "ENDPOINT", "http://localhost:4318").rstrip("/") + "/v1/traces"
        self.endpoint = endpoint
        parts = urllib.parse.urlsplit(endpoint)  # for log lines: without any user:password@
        self._shown = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl() \
            if parts.hostname else "the collector"
        self.timeout = _timeout(_env(env, "TIMEOUT"))
        self.gzip = _env(env, "COMPRESSION").lower() == "gzip"
        self._https = parts.scheme == "https"
        self._address = (parts.hostname or "localhost", parts.port or (443 if self._https else 80))
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # every name lower-cased (as _headers gives the variable's), so that none goes out twice; the body's
        # type and encoding are ours whatever the variable says
        self._headers = {**_headers(_env(env, "HEADERS")), "content-type": "application/x-protobuf"}
        if self.gzip:
            self._headers["content-encoding"] = "gzip"
        else:
            self._headers.pop("content-encoding", None)
        if parts.username is not None and "authorization" not in self._headers:
            # credentials in the endpoint's URL, as requests (the SDK exporter's client) sends them
            pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self._headers["authorization"] = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")
        self._certificate = _env(env, "CERTIFICATE") or None
        self._client_cert = (_env(env, "CLIENT_CERTIFICATE") or None, _env(env, "CLIENT_KEY") or None)
        self._connection: http.client.HTTPConnection | None = None  # kept alive from post to post
        self._encoder = Encoder()
        self._lock = threading.Lock()  # one export at a time: the encoder's caches and the connection
        self._stopped = threading.Event()
        self.exported = self.failed = 0

    def export(self, spans) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult
        if self._stopped.is_set():
            return SpanExportResult.FAILURE
        with self._lock:
            data = self._encoder.request(spans)
            if self.gzip:
                data = gzip.compress(data, 5)
            ok = self._post(data)
        if ok:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def _post(self, data: bytes) -> bool:
        deadline, delay = time.monotonic() + self.timeout, 1.0
        while True:
            left = deadline - time.monotonic()
            try:
                status, retry_after = self._send(data, max(left, 0.1))
                if 200 <= status < 300:
                    return True
                problem, retry = f"answered {status}", status in _RETRYABLE
                wait = _retry_after(retry_after, delay)
            except (OSError, http.client.HTTPException) as exc:
                problem, retry, wait = type(exc).__name__, True, delay
            if not retry or self._stopped.is_set() or time.monotonic() + wait >= deadline:
                log.warning("span export to %s failed (%s): batch dropped", self._shown, problem)
                return False
            if self._stopped.wait(wait * random.uniform(0.8, 1.2)):
                return False
            delay = min(delay * 2, 32.0)

    def _send(self, data: bytes, timeout: float) -> tuple[int, str | None]:
        """One post (status, Retry-After) on the kept connection; a kept connection the collector has closed
        meanwhile is replaced at once, once."""
        for attempt in (1, 2):
            reused = self._connection is not None
            connection = self._connection or self._connect(timeout)
            connection.timeout = timeout
            if connection.sock is not None:
                connection.sock.settimeout(timeout)
            try:
                connection.request("POST", self._target, body=data, headers=self._headers)
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                self._close()
                if reused and attempt == 1:
                    continue
                raise
            if response.will_close:
                self._close()
            return response.status, response.getheader("Retry-After")
        raise AssertionError("unreachable")

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        host, port = self._address
        if self._https:
            import ssl
            context = ssl.create_default_context(cafile=self._certificate)
            cert, key = self._client_cert
            if cert:
                context.load_cert_chain(cert, key)
            self._connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        else:
            self._connection = http.client.HTTPConnection(host, port, timeout=timeout)
        return self._connection

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def shutdown(self) -> None:
        self._stopped.set()
        self._close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # nothing is buffered here: the processor in front holds the queue


def _timeout(value: str) -> float:
    """``OTEL_EXPORTER_OTLP_TIMEOUT`` in seconds. The specification counts milliseconds, the Python SDK
    seconds: a value of 100 or more is read as milliseconds (nobody means a wait of minutes), a smaller one
    as seconds (10, the SDK's default). Unset or not a positive number: 10 s."""
    try:
        number = float(value)
    except ValueError:
        return 10.0
    if not number > 0:
        return 10.0
    return number / 1000 if number >= 100 else number


def _retry_after(value: str | None, default: float) -> float:
    try:
        return max(0.0, min(float(value), 60.0)) if value else default
    except ValueError:
        return default

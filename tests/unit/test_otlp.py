"""The hand-written OTLP encoder writes what the SDK's own encoder writes: both outputs are parsed with the
generated protobuf classes and compared as messages, over spans of every shape the services record and some
they do not (events, links, trace state, arrays, every value type, error statuses, other resources)."""
from __future__ import annotations

import base64
import gzip
import http.server
import threading

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from bookshop import otlp


def recorded_spans() -> list:
    memory = InMemorySpanExporter()
    spans = []
    for service in ("gateway", "orders"):
        provider = TracerProvider(resource=Resource.create({"service.name": service, "deploy.count": 3}))
        provider.add_span_processor(SimpleSpanProcessor(memory))
        tracer = provider.get_tracer("bookshop", "1.2", schema_url="https://opentelemetry.io/schemas/1.21.0")
        remote = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True,
                             TraceFlags(1), TraceState([("vendor", "x1"), ("other", "y")]))
        with tracer.start_as_current_span("GET /api/v1/books/{isbn}", context=None, kind=SpanKind.SERVER,
                                          attributes={"http.request.method": "GET", "url.path": "/b/1"}):
            pass
        parent_ctx = __import__("opentelemetry.trace", fromlist=["set_span_in_context"]).set_span_in_context(
            NonRecordingSpan(remote))
        span = tracer.start_span("POST /api/v1/orders", parent_ctx, SpanKind.SERVER, {
            "int": 7, "negative": -12, "big": 2**62, "float": 2.5, "bool": True, "false": False, "text": "é€",
            "strings": ["a", "b"], "ints": [1, 2, 3], "empty": "", "floats": (1.5, -0.0)},
            links=[Link(remote, {"link.kind": "origin"}), Link(SpanContext(5, 6, False))])
        span.add_event("retry", {"attempt": 2})
        span.add_event("plain")
        span.set_status(Status(StatusCode.ERROR, "upstream down"))
        span.end()
        for kind in (SpanKind.CLIENT, SpanKind.INTERNAL, SpanKind.PRODUCER, SpanKind.CONSUMER):
            child = tracer.start_span(f"{kind.name} call", None, kind)
            child.set_status(Status(StatusCode.OK))
            child.end()
        unset = tracer.start_span("no status")
        unset.end()
        spans.extend(memory.get_finished_spans())
        memory.clear()
    return spans


def parsed(data: bytes) -> ExportTraceServiceRequest:
    """Our bytes parsed, less the one field the SDK's encoder leaves out: a link's trace state (the OTLP schema
    has it; ours is checked, then cleared for the comparison)."""
    message = ExportTraceServiceRequest.FromString(data)
    states = []
    for resource in message.resource_spans:
        for scope in resource.scope_spans:
            for span in scope.spans:
                for link in span.links:
                    states.append(link.trace_state)
                    link.ClearField("trace_state")
    assert states.count("vendor=x1,other=y") == 2
    return message


def test_the_encoding_is_the_sdks_message_for_message():
    spans = recorded_spans()
    ours = parsed(otlp.Encoder().request(spans))
    theirs = ExportTraceServiceRequest.FromString(encode_spans(spans).SerializeToString())
    assert len(ours.resource_spans) == 2
    assert ours == theirs


def test_repeated_pairs_are_reused_and_still_right():
    spans = recorded_spans()
    encoder = otlp.Encoder()
    first, second = encoder.request(spans), encoder.request(spans)  # the second from the caches
    assert first == second
    assert parsed(second) == encode_spans(spans)


def test_a_value_it_cannot_encode_drops_that_attribute_only(caplog):
    spans = recorded_spans()[:1]
    spans[0]._attributes = {"ok": "yes", "huge": 2**70, "odd": object()}
    message = ExportTraceServiceRequest.FromString(otlp.Encoder().request(spans))
    (encoded,) = message.resource_spans[0].scope_spans[0].spans
    assert [kv.key for kv in encoded.attributes] == ["ok"]
    assert "not exported" in caplog.text


class Collector:
    """A stand-in collector on a free port: answers the first ``fail`` posts with ``status``, then 200."""

    def __init__(self, fail: int = 0, status: int = 503, keep_alive: bool = False, hang_up: bool = False):
        """``keep_alive``: HTTP/1.1, as a real collector speaks; ``hang_up``: and then close each connection
        after its answer without saying so (as a collector's idle timeout does, between two posts)."""
        self.bodies, self.headers, self.fail, self.status = [], [], fail, status
        self.peers: list[tuple] = []
        self.header_lists: list[list[tuple[str, str]]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.headers.append(dict(self.headers))
                outer.header_lists.append(list(self.headers.items()))  # repeated names kept
                outer.peers.append(self.client_address)
                if outer.fail:
                    outer.fail -= 1
                    self.send_response(outer.status)
                    self.send_header("Retry-After", "0")
                else:
                    outer.bodies.append(body)
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                if hang_up:
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector():
    made = []

    def make(**kw):
        made.append(Collector(**kw))
        return made[-1]
    yield make
    for c in made:
        c.close()


def test_the_exporter_posts_to_the_standard_endpoint_with_headers_and_gzip(collector):
    c = collector()
    exporter = otlp.SpanExporter({"OTEL_EXPORTER_OTLP_ENDPOINT": c.url + "/",
                                  "OTEL_EXPORTER_OTLP_HEADERS": "api-key=s%3Dcret,x-team=shop",
                                  "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "gzip"})
    assert exporter.endpoint == c.url + "/v1/traces"
    spans = recorded_spans()
    assert exporter.export(spans) == SpanExportResult.SUCCESS
    (body,) = c.bodies
    assert parsed(gzip.decompress(body)) == encode_spans(spans)
    headers = {k.lower(): v for k, v in c.headers[0].items()}
    assert headers["api-key"] == "s=cret" and headers["x-team"] == "shop"
    assert headers["content-type"] == "application/x-protobuf" and headers["content-encoding"] == "gzip"
    exporter.shutdown()


def test_headers_from_the_environment_never_repeat_or_replace_the_content_type(collector):
    """The variable's names are lower-cased; ours were not, so a ``Content-Type`` (or ``authorization``) in
    ``OTEL_EXPORTER_OTLP_HEADERS`` went out twice under two spellings."""
    c = collector()
    exporter = otlp.SpanExporter({"OTEL_EXPORTER_OTLP_ENDPOINT": c.url.replace("//", "//u:p@"),
                                  "OTEL_EXPORTER_OTLP_HEADERS": "Content-Type=text/plain,Authorization=Bearer t",
                                  "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"})
    assert exporter.export(recorded_spans()) == SpanExportResult.SUCCESS
    names = [k.lower() for k, _ in c.header_lists[0]]
    assert names.count("content-type") == 1 and names.count("authorization") == 1
    assert names.count("content-encoding") == 1
    headers = {k.lower(): v for k, v in c.header_lists[0]}
    assert headers["content-type"] == "application/x-protobuf"  # the body is protobuf, whatever was set
    assert headers["authorization"] == "Bearer t"  # set explicitly: not replaced by the URL's credentials
    exporter.shutdown()


def test_posts_share_one_connection_and_a_connection_the_collector_closed_is_replaced_at_once(collector):
    alive = collector(keep_alive=True)
    exporter = otlp.SpanExporter({"OTEL_EXPORTER_OTLP_ENDPOINT": alive.url})
    for _ in range(3):
        assert exporter.export(recorded_spans()) == SpanExportResult.SUCCESS
    assert len(alive.bodies) == 3 and len(set(alive.peers)) == 1
    exporter.shutdown()
    hanging = collector(keep_alive=True, hang_up=True)
    exporter = otlp.SpanExporter({"OTEL_EXPORTER_OTLP_ENDPOINT": hanging.url})
    for _ in range(3):  # no retry pause (1 s): the second and third posts find the old connection closed
        assert exporter.export(recorded_spans()) == SpanExportResult.SUCCESS
    assert len(hanging.bodies) == 3 and len(set(hanging.peers)) == 3 and exporter.failed == 0
    exporter.shutdown()


def test_credentials_in_the_endpoint_are_sent_as_basic_auth(collector):
    c = collector()
    exporter = otlp.SpanExporter({"OTEL_EXPORTER_OTLP_ENDPOINT": c.url.replace("//", "//us%40r:s3cret@")})
    assert exporter.export(recorded_spans()) == SpanExportResult.SUCCESS
    headers = {k.lower(): v for k, v in c.headers[0].items()}
    assert headers["authorization"] == "Basic " + base64.b64encode(b"us@r:s3cret").decode()


def test_a_busy_collector_is_retried_and_a_refusing_one_drops_the_batch(collector, caplog):
    busy = collector(fail=2, status=503)
    exporter = otlp.SpanExporter({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": busy.url + "/custom"})
    assert exporter.export(recorded_spans()) == SpanExportResult.SUCCESS
    assert len(busy.headers) == 3 and len(busy.bodies) == 1
    refusing = collector(fail=5, status=400)
    exporter = otlp.SpanExporter({"OTEL_EXPORTER_OTLP_ENDPOINT": refusing.url})
    assert exporter.export(recorded_spans()) == SpanExportResult.FAILURE
    assert len(refusing.headers) == 1  # a 400 is not retried
    assert "batch dropped" in caplog.text


def test_an_unreachable_collector_gives_up_at_the_timeout():
    exporter = otlp.SpanExporter({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
                                  "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
    assert exporter.export(recorded_spans()) == SpanExportResult.FAILURE
    assert exporter.failed > 0


def test_the_pair_cache_keeps_caching_what_repeats_and_never_per_request_values():
    pairs = otlp._Pairs()
    for n in range(3 * otlp._Pairs.LIMIT):
        pairs.attributes(9, {"url.path": f"/api/v1/books/{n}", "peer": f"p{n}", "http.request.method": "GET",
                             "server.port": n})
    texts, ints = pairs._by_number[9]
    assert not any(key[0] == "url.path" for key in texts)
    assert ("http.request.method", "GET") in texts  # still cached after the clears
    assert len(texts) <= otlp._Pairs.LIMIT and len(ints) <= otlp._Pairs.LIMIT


def test_equal_values_of_different_types_are_encoded_by_their_own_type():
    """(k, 1), (k, True) and (k, 1.0) are equal as dict keys: a cache keyed on them alone would give a bool
    the integer's encoding."""
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue
    pairs = otlp._Pairs()
    for value, field in ((1, "int_value"), (True, "bool_value"), (1.0, "double_value"), (1, "int_value")):
        encoded = pairs.attributes(9, {"k": value})
        kv = KeyValue()
        kv.ParseFromString(encoded[2:])  # the field's tag and length, then the KeyValue
        assert kv.value.WhichOneof("value") == field, value


def test_the_timeout_reads_milliseconds_or_seconds_and_credentials_stay_out_of_the_log(caplog):
    assert otlp._timeout("") == 10 and otlp._timeout("30") == 30 and otlp._timeout("500") == 0.5
    assert otlp._timeout("10000") == 10 and otlp._timeout("-1") == 10 and otlp._timeout("soon") == 10
    exporter = otlp.SpanExporter({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://user:s3cret@127.0.0.1:9",
                                  "OTEL_EXPORTER_OTLP_TIMEOUT": "300"})
    assert exporter.export(recorded_spans()) == SpanExportResult.FAILURE
    assert "127.0.0.1:9" in caplog.text and "s3cret" not in caplog.text


def test_per_request_text_values_of_any_length_are_the_sdks_bytes():
    # url.path / url.full values are encoded each time, their key's part once: lengths past one varint byte,
    # non-ASCII text, and a key whose value is text in one span and a number in another
    spans = recorded_spans()[:1]
    encoder = otlp.Encoder()
    for attributes in ({"url.path": "/" + "é" * 200, "url.full": "http://x/" + "a" * 20000, "k": "v"},
                       {"url.path": "", "k": 1}, {"url.path": "/b/2", "k": "1"}, {"k": True}):
        spans[0]._attributes = attributes
        assert ExportTraceServiceRequest.FromString(encoder.request(spans)) == encode_spans(spans)

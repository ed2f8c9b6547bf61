"""The request series are exported as prometheus_client's own Counter and Histogram would export them."""
from __future__ import annotations

import re

import prometheus_client as prom
from prometheus_client.parser import text_string_to_metric_families

from bookshop.metrics import BUCKETS, Metrics

OBSERVED = [("GET", "/api/v1/books/([^/]{1,64})", 200, 0.0004), ("GET", "/api/v1/books/([^/]{1,64})", 200, 0.001),
            ("GET", "/api/v1/books/([^/]{1,64})", 200, 0.0011), ("POST", "/api/v1/orders", 201, 0.3),
            ("GET", "/api/v1/books/([^/]{1,64})", 404, 12.5), ("BREW", "unknown", 405, 0.0),
            ("GET", "/healthz", 200, 10.0), ("GET", "/api/v1/books/([^/]{1,64})", 200, 0.0025)]


def reference(observed) -> str:
    """What the same requests gave through prometheus_client's Counter and Histogram (before RequestSeries)."""
    registry = prom.CollectorRegistry()
    labels = ["service", "method", "route", "status"]
    requests = prom.Counter("bookshop_http_requests", "HTTP requests served", labels, registry=registry)
    latency = prom.Histogram("bookshop_http_request_duration_seconds", "HTTP request latency", labels,
                             buckets=BUCKETS, registry=registry)
    prom.Counter("bookshop_domain_events", "domain counters (orders, reservations, ...)", ["service", "name"],
                 registry=registry)
    prom.Gauge("bookshop_gauge", "current values (websocket clients, ...)", ["service", "name"], registry=registry)
    for method, route, status, seconds in observed:
        method = method if method != "BREW" else "other"
        requests.labels("catalog", method, route, str(status)).inc()
        latency.labels("catalog", method, route, str(status)).observe(seconds)
    return prom.generate_latest(registry).decode()


def without_times(text: str) -> str:
    return re.sub(r"^(\w+_created\{.*\}) \S+$", r"\1 T", text, flags=re.M)


def test_the_request_series_are_the_text_the_library_writes():
    metrics = Metrics("catalog")
    for observed in OBSERVED:
        metrics.observe(*observed)
    text = metrics.render().decode()
    assert without_times(text) == without_times(reference(OBSERVED))
    assert 'bookshop_http_requests_total{method="GET",route="/api/v1/books/([^/]{1,64})",service="catalog",' \
           'status="200"} 4.0' in text
    # the bucket a value on a bound counts in is that bound's (le: less than or equal)
    assert 'bookshop_http_request_duration_seconds_bucket{le="0.001",method="GET",route="/api/v1/books/([^/]{1,64})"' \
           ',service="catalog",status="200"} 2.0' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["bookshop_http_requests"].type == "counter"
    assert families["bookshop_http_request_duration_seconds"].type == "histogram"


def test_no_request_yet_is_the_same_text_too():
    assert without_times(Metrics("catalog").render().decode()) == without_times(reference([]))

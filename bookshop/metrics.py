"""Prometheus metrics, one registry per application (several apps may share a test process)."""
from __future__ import annotations

import prometheus_client as prom

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, service: str):
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("bookshop_http_requests", "HTTP requests served",
                                     ["service", "method", "route", "status"], registry=self.registry)
        self.latency = prom.Histogram("bookshop_http_request_duration_seconds", "HTTP request latency",
                                      ["service", "method", "route", "status"], buckets=BUCKETS,
                                      registry=self.registry)
        self.domain = prom.Counter("bookshop_domain_events", "domain counters (orders, reservations, ...)",
                                   ["service", "name"], registry=self.registry)
        self.gauges = prom.Gauge("bookshop_gauge", "current values (websocket clients, ...)",
                                 ["service", "name"], registry=self.registry)
        self.service = service

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = (self.service, method, route, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def count(self, name: str, amount: float = 1) -> None:
        self.domain.labels(self.service, name).inc(amount)

    def gauge(self, name: str, value: float) -> None:
        self.gauges.labels(self.service, name).set(value)

    def render(self) -> bytes:
        return prom.generate_latest(self.registry)

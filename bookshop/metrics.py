"""Prometheus metrics, one registry per application (several apps may share a test process).

What every service exports (deploy/monitoring/ holds the alert rules and the dashboard over these):

- ``bookshop_http_requests_total`` and ``bookshop_http_request_duration_seconds`` by ``service``, ``method``,
  ``route`` (the route's pattern) and ``status``;
- ``bookshop_domain_events_total{service, name}``: what the shop did (orders confirmed, logins failed, slow
  WebSocket clients dropped, ...); the names in ``DOMAIN_EVENTS`` are there from start-up, at 0, so that
  ``rate()`` and ``increase()`` see their first event;
- ``bookshop_gauge{service, name}``: current values: ``ready`` (1/0, set at each ``/readyz``),
  ``websocket_clients`` (gateway), ``saga_recovery_backlog`` (orders: open orders whose owner's lease ran out,
  measured every 5 s), ...;
- ``bookshop_upstream_circuit_open`` and ``bookshop_upstream_refused_total`` by ``service`` and ``upstream``:
  the circuit breakers of the calls to sibling services (see ``bookshop.clients.base.UpstreamStates``).
"""
from __future__ import annotations

import prometheus_client as prom

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: the method label takes these values; any other method a client sends counts as "other" (each distinct
#: label value is a series kept in memory for the life of the process)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

#: domain events each service exports from start-up (others appear when they first happen)
DOMAIN_EVENTS = {
    "gateway": ("websocket_slow_clients", "websocket_refused_per_address", "websocket_rate_limited"),
    "users": ("logins", "logins_failed", "users_registered", "logouts", "password_changes"),
    "inventory": ("restocks", "reservations_held", "reservations_rejected"),
    "orders": ("orders_created", "orders_confirmed", "orders_declined", "orders_out_of_stock",
               "orders_payment_unavailable", "orders_cancelled", "orders_shipped", "orders_recovered"),
    "payments": ("charges_charged", "charges_declined", "refunds"),
}


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
        # (method, route, status) -> the two series of that request kind: labels() validates and locks on
        # every call, and observe() runs for every request
        self._series: dict[tuple, tuple] = {}
        for name in DOMAIN_EVENTS.get(service, ()):
            self.domain.labels(service, name)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in METHODS:
            method = "other"
        key = (method, route, status)
        series = self._series.get(key)
        if series is None:
            labels = (self.service, method, route, str(status))
            series = self._series[key] = (self.requests.labels(*labels), self.latency.labels(*labels))
        series[0].inc()
        series[1].observe(seconds)

    def count(self, name: str, amount: float = 1) -> None:
        self.domain.labels(self.service, name).inc(amount)

    def gauge(self, name: str, value: float) -> None:
        self.gauges.labels(self.service, name).set(value)

    def render(self) -> bytes:
        return prom.generate_latest(self.registry)

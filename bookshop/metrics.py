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

import bisect
import time

import prometheus_client as prom
from prometheus_client import metrics as prom_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

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
        self.requests = RequestSeries(service)
        self.registry.register(self.requests)
        self.domain = prom.Counter("bookshop_domain_events", "domain counters (orders, reservations, ...)",
                                   ["service", "name"], registry=self.registry)
        self.gauges = prom.Gauge("bookshop_gauge", "current values (websocket clients, ...)",
                                 ["service", "name"], registry=self.registry)
        self.service = service
        self._series = self.requests.series
        for name in DOMAIN_EVENTS.get(service, ()):
            self.domain.labels(service, name)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """One request served: ``bookshop_http_requests_total`` and ``bookshop_http_request_duration_seconds``
        of its method, route and status (this runs for every request)."""
        if method not in METHODS:
            method = "other"
        key = (method, route, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = [0.0, 0.0, [0.0] * (len(BUCKETS) + 1), time.time()]
        series[0] += 1.0
        series[1] += seconds
        series[2][bisect.bisect_left(BUCKETS, seconds)] += 1.0

    def count(self, name: str, amount: float = 1) -> None:
        self.domain.labels(self.service, name).inc(amount)

    def gauge(self, name: str, value: float) -> None:
        self.gauges.labels(self.service, name).set(value)

    def render(self) -> bytes:
        return prom.generate_latest(self.registry)


class RequestSeries:
    """``bookshop_http_requests_total`` and ``bookshop_http_request_duration_seconds``, by ``service``,
    ``method``, ``route`` and ``status``: a collector of plain numbers, exported as ``prometheus_client``'s
    ``Counter`` and ``Histogram`` would export them (same families, samples, values and ``_created``). A
    ``Counter`` and a ``Histogram`` would take a lock for each of their three counts and make eight calls
    per request; this is on the loop's thread, one dict look-up and three additions."""

    LABELS = ("service", "method", "route", "status")

    def __init__(self, service: str):
        self.service = service
        #: (method, route, status) -> [requests, seconds in all, requests by bucket (not cumulative; the last
        #: is above every bound), created]
        self.series: dict[tuple, list] = {}

    def describe(self):
        return [CounterMetricFamily("bookshop_http_requests", "HTTP requests served", labels=self.LABELS),
                HistogramMetricFamily("bookshop_http_request_duration_seconds", "HTTP request latency",
                                      labels=self.LABELS)]

    def collect(self):
        requests, latency = self.describe()
        created = prom_metrics._use_created  # PROMETHEUS_DISABLE_CREATED_SERIES, as the library's own metrics
        bounds = [floatToGoString(b) for b in BUCKETS] + ["+Inf"]
        for (method, route, status), (count, total, buckets, at) in list(self.series.items()):
            labels = [self.service, method, route, str(status)]
            requests.add_metric(labels, count, created=at if created else None)
            cumulative, acc = [], 0.0
            for bound, n in zip(bounds, buckets):
                acc += n
                cumulative.append((bound, acc))
            latency.add_metric(labels, cumulative, total)
            if created:
                latency.add_sample("bookshop_http_request_duration_seconds_created", dict(zip(self.LABELS, labels)),
                                   at)
        return [requests, latency]

"""The shared machinery of every upstream client.

Each process owns one ``aiohttp.ClientSession`` (``Http``). An ``UpstreamClient`` adds what every call to a
sibling service needs: a timeout, retries with backoff for idempotent calls (tenacity), a circuit breaker per
upstream (circuitbreaker), the caller's ``X-Request-ID`` and trace (``traceparent``, with a client span per
attempt), a service token, and the mapping of transport failures and 5xx answers to ``Unavailable``.
Subclasses turn 4xx answers into domain errors. ``UpstreamStates`` exports the breakers to Prometheus.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import weakref
from typing import Any, Iterator

import aiohttp
import circuitbreaker
import tenacity
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from bookshop import tracing
from bookshop.logs import request_id_var
from bookshop.services.errors import DomainError, Unavailable, UpstreamError

log = logging.getLogger(__name__)


class Http:
    """The process's one aiohttp session, created inside the running loop."""

    def __init__(self, limit: int = 200):
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit, ttl_dns_cache=300),
            json_serialize=json.dumps,
        )
        #: the upstream clients made with this session (for their breakers' metrics)
        self.clients: weakref.WeakSet = weakref.WeakSet()

    async def close(self) -> None:
        await self.session.close()


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    headers: dict

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def error(self) -> dict:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return self.body["error"]
        return {"code": "upstream_error", "message": f"upstream answered {self.status}"}


@dataclasses.dataclass(frozen=True)
class RawReply:
    status: int
    body: bytes
    headers: dict


class _Transient(Exception):
    """A failure worth counting against the breaker and retrying when the call is idempotent."""

    def __init__(self, message: str, reply: Reply | None = None, retry: bool = True):
        super().__init__(message)
        self.reply = reply
        self.retry = retry


class ServiceTokens:
    """OAuth2 client credentials: a cached ``service`` token from the users service."""

    def __init__(self, http: Http, users_url: str, client_id: str, secret: str, timeout: float = 3.0):
        self._http = http
        self._url = users_url.rstrip("/") + "/oauth/token"
        self._client_id = client_id
        self._secret = secret
        self._timeout = timeout
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    def invalidate(self) -> None:
        self._token = None

    async def token(self) -> str:
        if self._token and time.monotonic() < self._expires:
            return self._token
        async with self._lock:
            if self._token and time.monotonic() < self._expires:
                return self._token
            form = {"grant_type": "client_credentials", "client_id": self._client_id,
                    "client_secret": self._secret}
            headers = {"X-Request-ID": request_id_var.get() or "service-token"}
            span, status, error = tracing.start_call("users", "POST", self._url, "/oauth/token"), None, None
            tracing.inject(headers, span)
            try:
                async with self._http.session.post(
                        self._url, data=form, timeout=aiohttp.ClientTimeout(total=self._timeout),
                        headers=headers) as resp:
                    status = resp.status
                    body = await resp.json(content_type=None)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                error = type(exc).__name__
                raise Unavailable("users service unreachable for a service token", retry_after=2) from None
            finally:
                tracing.end_call(span, status, error)
            if status != 200:
                raise Unavailable(f"users service refused a service token ({status})", retry_after=2)
            self._token = body["access_token"]
            # renew a minute early (or halfway for short lives)
            life = float(body.get("expires_in", 60))
            self._expires = time.monotonic() + max(1.0, min(life - 60, life / 2))
            return self._token


class UpstreamClient:
    """Base class of the per-upstream clients (``CatalogClient``, ``InventoryClient``, ...)."""

    service = "upstream"
    retry_after = 2

    def __init__(self, http: Http, base_url: str, tokens: ServiceTokens | None = None, timeout: float = 3.0,
                 retries: int = 2, failure_threshold: int = 5, recovery_timeout: float = 5.0):
        self._http = http
        self.base_url = base_url.rstrip("/")
        self._tokens = tokens
        self._timeout = timeout
        self._retries = retries
        self.breaker = circuitbreaker.CircuitBreaker(
            failure_threshold=failure_threshold, recovery_timeout=recovery_timeout,
            expected_exception=_Transient, name=f"{self.service}@{self.base_url}")
        self._guarded_send = self.breaker.decorate(self._send)
        #: calls refused without trying because the breaker was open
        self.refused = 0
        http.clients.add(self)

    @property
    def is_open(self) -> bool:
        return self.breaker.opened

    async def _send(self, method: str, url: str, headers: dict, body: bytes | None, params, timeout) -> Reply:
        # each attempt is a span of its own
        span, status, error = tracing.start_call(self.service, method, url, url[len(self.base_url):]), None, None
        tracing.inject(headers, span)
        try:
            async with self._http.session.request(method, url, data=body, headers=headers, params=params,
                                                  timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                raw = await resp.read()
                try:
                    parsed = json.loads(raw) if raw else None
                except ValueError:
                    parsed = None
                reply = Reply(resp.status, parsed, dict(resp.headers))
                status = resp.status
        except asyncio.TimeoutError:
            error = "timeout"
            # not retried: a slow upstream is usually a loaded one, and a retry only adds to its load
            raise _Transient(f"{self.service} timed out", retry=False) from None
        except aiohttp.ClientError as exc:
            error = exc.__class__.__name__
            raise _Transient(f"{self.service} unreachable: {error}") from None
        finally:
            tracing.end_call(span, status, error)
        if reply.status >= 500 or (reply.status == 200 and raw and parsed is None):
            raise _Transient(f"{self.service} answered {reply.status}", reply)
        return reply

    async def request(self, method: str, path: str, *, json_body: Any = None, params: dict | None = None,
                      token: str | None = None, service_auth: bool = True, idempotent: bool | None = None,
                      headers: dict | None = None, timeout: float | None = None) -> Reply:
        """Send one call; transport failures, timeouts and 5xx raise ``Unavailable``."""
        idempotent = method in ("GET", "HEAD", "PUT", "DELETE") if idempotent is None else idempotent
        sent_headers = {"X-Request-ID": request_id_var.get() or "internal"}
        if headers:
            sent_headers.update(headers)
        body = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            sent_headers["Content-Type"] = "application/json"
        url = self.base_url + path
        attempts = 1 + (self._retries if idempotent else 0)
        try:
            async for attempt in tenacity.AsyncRetrying(
                    stop=tenacity.stop_after_attempt(attempts),
                    wait=tenacity.wait_exponential_jitter(initial=0.05, max=0.5),
                    retry=tenacity.retry_if_exception(lambda e: isinstance(e, _Transient) and e.retry),
                    reraise=True):
                with attempt:
                    if token is not None:
                        sent_headers["Authorization"] = f"Bearer {token}"
                    elif service_auth and self._tokens is not None:
                        sent_headers["Authorization"] = f"Bearer {await self._tokens.token()}"
                    reply = await self._guarded_send(method, url, sent_headers, body, params,
                                                     timeout or self._timeout)
                    if reply.status == 401 and token is None and self._tokens is not None:
                        # our service token may predate a key rotation: renew once
                        self._tokens.invalidate()
                        sent_headers["Authorization"] = f"Bearer {await self._tokens.token()}"
                        reply = await self._guarded_send(method, url, sent_headers, body, params,
                                                         timeout or self._timeout)
                    return reply
        except circuitbreaker.CircuitBreakerError:
            self.refused += 1
            raise Unavailable(f"{self.service} is unavailable (circuit open)",
                              retry_after=max(1, int(self.breaker.open_remaining) + 1)) from None
        except _Transient as exc:
            log.warning("upstream %s failed: %s", self.service, exc)
            if exc.reply is not None:
                raise UpstreamError(f"{self.service} failed", retry_after=self.retry_after) from None
            raise Unavailable(f"{self.service} is unavailable", retry_after=self.retry_after) from None

    async def raw(self, method: str, path: str, query: str, headers: dict, body: bytes | None,
                  timeout: float = 30.0) -> "RawReply":
        """Forward a call as it came (the gateway's proxy): no retries, the caller's own token, the
        upstream's answer passed back whatever its status; only an unreachable upstream raises."""
        url = self.base_url + path + (f"?{query}" if query else "")
        sent = {"X-Request-ID": request_id_var.get() or "internal", **headers}
        span, status, error = tracing.start_call(self.service, method, self.base_url + path, path), None, None
        tracing.inject(sent, span)
        try:
            async with self._http.session.request(method, url, data=body, headers=sent,
                                                  timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                status = resp.status
                return RawReply(resp.status, await resp.read(), dict(resp.headers))
        except asyncio.TimeoutError:
            error = "timeout"
            raise Unavailable(f"{self.service} timed out", retry_after=self.retry_after) from None
        except aiohttp.ClientError as exc:
            error = exc.__class__.__name__
            raise Unavailable(f"{self.service} is unavailable", retry_after=self.retry_after) from None
        finally:
            tracing.end_call(span, status, error)

    @staticmethod
    def raise_for(reply: Reply, default: type[DomainError] = UpstreamError) -> None:
        """Turn a non-2xx reply into the domain error it describes."""
        from bookshop.services import errors
        if reply.ok:
            return
        err = reply.error()
        by_status = {400: errors.InvalidInput, 401: errors.Unauthenticated, 403: errors.Forbidden,
                     404: errors.NotFound, 409: errors.Conflict, 402: errors.PaymentDeclined,
                     422: errors.IdempotencyMismatch, 429: errors.RateLimited}
        cls = by_status.get(reply.status, default)
        raise cls(err.get("message"), code=err.get("code"), details=err.get("details"))


class UpstreamStates:
    """A Prometheus collector of a process's circuit breakers, read when scraped: per upstream,
    ``bookshop_upstream_circuit_open`` (1 while calls are refused without trying; back to 0 once the
    recovery timeout lets a trial call through) and ``bookshop_upstream_refused_total`` (calls refused so
    far). Several clients of one upstream (the gateway has two for inventory) add up."""

    def __init__(self, service: str, http: Http):
        self.service = service
        self._http = http

    def describe(self) -> list:
        return []  # checked when scraped, not when registered

    def collect(self) -> Iterator:
        opened = GaugeMetricFamily("bookshop_upstream_circuit_open",
                                   "1 while the circuit breaker of calls to an upstream is open",
                                   labels=["service", "upstream"])
        refused = CounterMetricFamily("bookshop_upstream_refused",
                                      "calls to an upstream refused by its open circuit breaker",
                                      labels=["service", "upstream"])
        states: dict[str, list] = {}
        for client in list(self._http.clients):
            state = states.setdefault(client.service, [0, 0])
            state[0] = max(state[0], 1 if client.is_open else 0)
            state[1] += client.refused
        for upstream, (is_open, count) in sorted(states.items()):
            opened.add_metric([self.service, upstream], is_open)
            refused.add_metric([self.service, upstream], count)
        yield opened
        yield refused

"""The base handler every service's handlers derive from.

It owns the HTTP conventions of the contract: the JSON error body for every error (Tornado's own 404/405
and uncaught exceptions included), ``X-Request-ID`` on every response, the request's server span (its trace
from the caller's ``traceparent``, or a new one), the 1 MiB body limit answered with a
JSON 413 (bodies are streamed so the limit is ours, not Tornado's bare 400), strict JSON parsing, token
decoding in ``prepare()`` and the one mapping from domain errors to HTTP statuses.

Every handler needs a token unless it declares the methods that are public (``public = {"GET"}``).
"""
from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any, TypeVar

import pydantic
import tornado
import tornado.web
from tornado import httputil

from bookshop import auth, tracing
from bookshop.errors import is_unavailable
from bookshop.logs import request_id_var
from bookshop.services import errors
from bookshop.validation import parse_json, validate

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

T = TypeVar("T", bound=pydantic.BaseModel)

STATUS = {
    errors.InvalidInput: 400,
    errors.Unauthenticated: 401,
    errors.PaymentDeclined: 402,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.PayloadTooLarge: 413,
    errors.IdempotencyMismatch: 422,
    errors.RateLimited: 429,
    errors.Unavailable: 503,
}

TORNADO_CODES = {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 413: "payload_too_large", 500: "internal_error",
                 503: "service_unavailable"}


def status_of(error: errors.DomainError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(code: str, message: str, request_id: str | None, details: dict | None = None) -> dict:
    body = {"code": code, "message": message, "request_id": request_id}
    if details:
        body["details"] = details
    return {"error": body}


def encode_json(data: Any) -> str:
    """The one way a body is written, errors included: compact JSON."""
    return json.dumps(data, separators=(",", ":"), default=str)


@tornado.web.stream_request_body
class BaseHandler(tornado.web.RequestHandler):
    """JSON in, JSON out, with the contract's errors, request ids and authentication."""

    #: HTTP methods that need no token (the contract's "anyone" rows and the operational routes)
    public: frozenset[str] | set[str] = frozenset()
    #: the service's context (settings, metrics, tokens, event log), set by initialize()
    ctx: Any = None
    #: the service's collaborators (one frozen dataclass per service, ``bookshop/deps.py``), set by initialize();
    #: each service's handlers declare its type
    deps: Any = None
    route: str = "?"

    def initialize(self, ctx=None, route: str = "?", deps=None, **_):
        self.ctx = ctx
        self.deps = deps
        self.route = route
        self.principal: auth.Principal | None = None
        self._span = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._too_large = False

    # -- request id and content ---------------------------------------------------------------------------
    def clear(self) -> None:
        """Tornado's ``clear()`` (it runs for every request, and again when an error replaces a response),
        with the ``Date`` header's text made once a second instead of each time (``format_timestamp`` is
        most of the method's cost). The Content-Type is ours (``set_default_headers``), not text/html."""
        headers = self._headers = httputil.HTTPHeaders()
        headers["Server"] = _SERVER
        headers["Date"] = _http_date()
        self.set_default_headers()
        self._write_buffer = []
        self._status_code = 200
        self._reason = "OK"

    def set_default_headers(self) -> None:
        # also runs when an error clears the response: keep the request id on it
        headers = self._headers
        rid = getattr(self, "_request_id", None)
        if rid is not None:
            headers["X-Request-ID"] = rid  # checked once, in _begin()
        # constants: straight into the headers, without set_header's checks of each value (for every request)
        headers["Content-Type"] = "application/json; charset=UTF-8"
        headers["Cache-Control"] = "no-store"
        headers["X-Content-Type-Options"] = "nosniff"

    @property
    def request_id(self) -> str:
        rid = getattr(self, "_request_id", None)
        if rid is None:
            rid = self._begin()
        return rid

    def _begin(self) -> str:
        """Start the request's span (current from here on: log lines and upstream calls carry its trace) and
        settle its id: the caller's ``X-Request-ID``, or else the trace id (random like a uuid4, and free)."""
        request = self.request
        self._span = tracing.start_request(request.headers, request.method, self.route, request.path)
        given = _header(request.headers, "X-Request-ID") or ""
        if REQUEST_ID.match(given):
            rid = given
        else:
            ids = tracing.current_ids()
            rid = ids[0] if ids else uuid.uuid4().hex
        self._request_id = rid
        # straight into the headers: the id is the caller's, matched by REQUEST_ID (no character set_header
        # would refuse), or hex digits
        self._headers["X-Request-ID"] = rid
        request_id_var.set(rid)
        return rid

    def compute_etag(self) -> None:
        # every answer is Cache-Control: no-store, so nothing would revalidate with an ETag: not worth a
        # SHA-1 of each body
        return None

    def check_etag_header(self) -> bool:
        # Tornado's answer without an Etag is False, reached through two header look-ups that raise and catch
        # KeyError and a regex over If-None-Match: finish() asks it for every 200 GET
        if "Etag" not in self._headers:
            return False
        return super().check_etag_header()

    def finish(self, chunk=None):
        """Tornado's ``finish()``; a 200 with no Etag finished with its body gets its ``Content-Length`` set
        here, straight into the headers (Tornado sets it through ``set_header``, whose checks of an int cost
        as much as the rest of its work): the same header, with the same value, in the same place."""
        headers = self._headers
        if chunk is not None and self._status_code == 200 and not self._headers_written and not self._finished \
                and "Content-Length" not in headers and "Etag" not in headers \
                and type(self).compute_etag is BaseHandler.compute_etag:
            self.write(chunk)
            headers["Content-Length"] = str(sum(map(len, self._write_buffer)))
            chunk = None
        return super().finish(chunk)

    def prepare(self):
        """Settles the request id and span, then what is decided before the body (``check()``). Tornado
        awaits ``prepare()`` only when it returns an awaitable: a public request with no body and no token
        that ``public_anonymous()`` accepts is decided here and now, without a coroutine."""
        _ = self.request_id
        inflight = getattr(self.ctx, "inflight", None)
        if inflight is not None:
            inflight.add(self)
        if not self._stream_request_body and self.public_anonymous():
            return None
        return self._prepare()

    def public_anonymous(self) -> bool:
        """True when ``check()`` would let this request through with no principal, decided without awaiting:
        the method is one of the handler's public ones, the route has it, and no ``Authorization`` is given.
        False means "ask ``check()``" (never that the request is refused). A handler that overrides
        ``check()`` overrides this too, or else its requests always take ``check()``; one that overrides
        ``authenticate()`` always takes it."""
        if type(self).check is not BaseHandler.check:
            return False
        return self._public_and_anonymous()

    def _public_and_anonymous(self) -> bool:
        request = self.request
        method = request.method
        if method not in self.public or "Authorization" in request.headers:
            return False
        # what the class decides (the same for each of its requests), found out once per class and method
        key = (type(self), method)
        ok = _OPEN.get(key)
        if ok is None:
            ok = _OPEN[key] = _open(type(self), method)
        return ok

    async def _prepare(self):
        if self._stream_request_body:  # else there is no body (Application)
            length = _header(self.request.headers, "Content-Length")
            if length is not None and length.isdigit() and int(length) > MAX_BODY:
                # answered with 413 once the body is read (and discarded): answering before would reset the
                # connection while the client is still sending, and it would never see our JSON
                self._too_large = True
            self.request.connection.set_max_body_size(64 * MAX_BODY)
        try:
            await self.check()
        except (errors.DomainError, tornado.web.HTTPError) as exc:
            # prepare() of a streaming handler runs before the request is fully read, and answering then
            # makes Tornado drop the keep-alive connection under the client's feet: read (and discard) the
            # body first, then answer
            self._refusal = exc
            self._chunks = []
            setattr(self, self.request.method.lower(), self._refuse)

    async def check(self) -> None:
        """What is decided before the body: the method exists, the caller is authenticated."""
        method = self.request.method.lower()
        if getattr(type(self), method, None) is getattr(tornado.web.RequestHandler, method, None):
            raise tornado.web.HTTPError(405)  # before authentication: the route has no such method
        await self.authenticate()

    async def _refuse(self, *args, **kwargs):
        raise self._refusal

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if getattr(self, "_refusal", None) is not None:
            return
        if self._size > MAX_BODY:
            self._too_large = True
            self._chunks = []
        elif not self._too_large:
            self._chunks.append(chunk)

    @property
    def body(self) -> bytes:
        if self._too_large:
            raise errors.PayloadTooLarge()
        return b"".join(self._chunks)

    def json_body(self, model: type[T] | None = None) -> Any:
        data = parse_json(self.body)
        return validate(model, data) if model is not None else data

    # -- authentication ---------------------------------------------------------------------------------
    async def authenticate(self) -> None:
        token = auth.bearer(_header(self.request.headers, "Authorization"))
        if token is not None:
            verifier = getattr(self.ctx, "verifier", None)
            if verifier is None:
                raise errors.Unauthenticated("this service does not accept tokens")
            self.principal = await verifier.verify(token)
        elif self.request.method not in self.public:
            raise errors.Unauthenticated()

    def require(self, *roles: str) -> auth.Principal:
        """The caller, if their role is one of ``roles`` (403 otherwise)."""
        if self.principal is None:
            raise errors.Unauthenticated()
        if self.principal.role not in roles:
            raise errors.Forbidden(f"this needs the role {' or '.join(roles)}")
        return self.principal

    # -- output -----------------------------------------------------------------------------------------
    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(encode_json(data))

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if exc is not None and is_unavailable(exc):
            exc = errors.Unavailable("the database is unavailable", retry_after=2)
        self.clear_header("Content-Disposition")
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        if isinstance(exc, errors.DomainError):
            status = status_of(exc)
            self.set_status(status)
            if exc.retry_after is not None or status in (429, 503):
                self.set_header("Retry-After", str(exc.retry_after or 1))
            body = error_body(exc.code, exc.message, self.request_id, exc.details)
        elif isinstance(exc, tornado.web.HTTPError) and status_code < 500:
            body = error_body(TORNADO_CODES.get(status_code, "http_error"),
                              exc.log_message or self._reason, self.request_id)
        else:
            body = error_body(TORNADO_CODES.get(status_code, "internal_error"),
                              "internal error" if status_code == 500 else self._reason, self.request_id)
        self.finish(encode_json(body))

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, errors.DomainError):
            return  # an expected answer, not a fault
        if isinstance(value, tornado.web.HTTPError):
            return
        if is_unavailable(value):
            log.warning("database unavailable during %s %s", self.request.method, self.route)
            return
        log.error("uncaught exception in %s %s", self.request.method, self.route,
                  exc_info=(typ, value, tb))

    def on_finish(self) -> None:
        inflight = getattr(self.ctx, "inflight", None)
        if inflight is not None:
            inflight.discard(self)
        span = getattr(self, "_span", None)
        if span is not None:
            self._span = None
            tracing.end_request(span, self.get_status())

    def on_connection_close(self) -> None:
        self.on_finish()
        super().on_connection_close()


class Application(tornado.web.Application):
    """Serves a request without a body with a non-streaming twin of its handler class.

    ``BaseHandler`` reads bodies as a stream (that is what lets it answer a body over the limit with a JSON
    413), and a streaming handler costs every request two more wake-ups of its task (prepare, then wait for
    the body); a request with no body to read (no ``Content-Length`` or 0, no ``Transfer-Encoding``: most
    GETs) need not pay them."""

    _twins: dict[type, type] = {}

    def get_handler_delegate(self, request, target_class, target_kwargs=None, path_args=None, path_kwargs=None):
        if target_class._stream_request_body and _bodiless(request.headers):
            twin = self._twins.get(target_class)
            if twin is None:
                twin = self._twins[target_class] = type(target_class.__name__, (target_class,), {
                    "_stream_request_body": False, "__module__": target_class.__module__,
                    "__qualname__": target_class.__qualname__})
            target_class = twin
        return super().get_handler_delegate(request, target_class, target_kwargs, path_args, path_kwargs)


#: (handler class, method) -> whether the class lets a public anonymous request of that method through
#: without awaiting (see ``_open``)
_OPEN: dict[tuple[type, str], bool] = {}


def _open(cls: type, method: str) -> bool:
    """The class's part of ``BaseHandler._public_and_anonymous``: it has the method, and no authenticate() of
    its own (the account routes read the gateway's relay token there: it must run)."""
    if cls.authenticate is not BaseHandler.authenticate:
        return False
    name = method.lower()
    return getattr(cls, name, None) is not getattr(tornado.web.RequestHandler, name, None)


_SERVER = f"TornadoServer/{tornado.version}"
_date = [-1, ""]  # (the second, its Date header text)


def _http_date() -> str:
    """``httputil.format_timestamp(time.time())``, made once a second."""
    now = time.time()
    second = int(now)
    if second != _date[0]:
        _date[1] = httputil.format_timestamp(second)
        _date[0] = second
    return _date[1]


def _bodiless(headers) -> bool:
    return "Transfer-Encoding" not in headers and _header(headers, "Content-Length") in (None, "0")


def _header(headers, name: str) -> str | None:
    """``headers.get(name)``, without the KeyError that ``HTTPHeaders.get`` raises and catches for a header
    the request does not have (most of them, for every request)."""
    return headers[name] if name in headers else None


class NotFoundHandler(BaseHandler):
    """The app's default handler: a JSON 404 for any unknown path."""

    public = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

    async def check(self) -> None:
        raise errors.NotFound(f"no route for {self.request.path}")

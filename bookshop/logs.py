"""JSON log lines carrying the service, the request id and the trace of the request being served."""
from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sys
import time

from opentelemetry import trace

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
service_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("service", default=None)
#: the (trace id, span id) of the request being served, as the log lines write them (bookshop.tracing sets it)
trace_ids_var: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("trace_ids", default=None)

_quote = json.encoder.encode_basestring_ascii  # a JSON string literal, as json.dumps writes it (C)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``at``, ``level``, ``logger``, ``service``, ``request_id``, ``trace_id`` (32 hex
    digits) and ``span_id`` (16) while a request is served, ``msg``, and ``exc`` with a traceback."""

    def __init__(self):
        super().__init__()
        self._second = -1
        self._prefix = ""
        self._millis = -1
        self._text = ""
        #: (level, logger, service) -> the line's text from after ``at`` to before ``request_id``: the same for
        #: every line of a logger at a level (a few hundred at most; cleared if there were ever more)
        self._heads: dict[tuple, str] = {}

    def _at(self, created: float) -> str:
        # the same text as datetime.isoformat(timespec="milliseconds") in UTC, its date part made once a second
        # and the whole of it once a millisecond (the lines of one turn of the loop mostly share it)
        second = int(created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
            self._millis = -1
        millis = min(999, round((created - second) * 1e6) // 1000)
        if millis != self._millis:
            self._text = f"{self._prefix}.{millis:03d}+00:00"
            self._millis = millis
        return self._text

    def format(self, record: logging.LogRecord) -> str:
        # put together by hand: json.dumps would build an encoder for each line (this runs for every request)
        return self.line(record.created, record.levelname, record.name, record.getMessage(),
                         getattr(record, "service", None), getattr(record, "request_id", None),
                         self.formatException(record.exc_info) if record.exc_info else None)

    def line(self, created: float, level: str, logger: str, msg: str, service=None, request_id=None,
             exc: str | None = None) -> str:
        """The line of one record, from its parts (``format`` of a record; ``AccessLog`` without one)."""
        service = service or service_var.get()
        key = (level, logger, service)
        head = self._heads.get(key)
        if head is None:
            head = f'", "level": {_quote(level.lower())}, "logger": {_quote(logger)}'
            if service is not None:
                head += f', "service": {_quote(str(service))}'
            if len(self._heads) >= 512:
                self._heads.clear()
            self._heads[key] = head
        request_id = request_id or request_id_var.get()
        rid = "" if request_id is None else f', "request_id": {_quote(str(request_id))}'
        ids = trace_ids_var.get()
        if ids is None:  # not in a request: a span made current some other way, or none
            span = trace.get_current_span().get_span_context()
            if span.is_valid:
                ids = (span.trace_id.to_bytes(16, "big").hex(), span.span_id.to_bytes(8, "big").hex())
        trace_part = "" if ids is None else f', "trace_id": "{ids[0]}", "span_id": "{ids[1]}"'
        tail = "}" if exc is None else f', "exc": {_quote(exc)}}}'
        return f'{{"at": "{self._at(created)}{head}{rid}{trace_part}, "msg": {_quote(msg)}{tail}'


class LineHandler(logging.StreamHandler):
    """A ``StreamHandler`` that writes each line in one call, and flushes only a stream that does not write
    through by itself (stderr does).

    ``write_soon`` (the access lines: one per request) keeps a line until the event loop's current turn is
    over, and then writes the lines of that turn in one call: the requests a turn serves cost one write, not
    one each. Anything else written (``emit``, ``write``), ``flush()`` (``logging.shutdown`` at exit calls it)
    and ``close()`` write the kept lines first, so lines stay in order and none is left behind."""

    def __init__(self, stream):
        super().__init__(stream)
        self._flush = not (getattr(stream, "write_through", False) or getattr(stream, "line_buffering", False))
        self._kept: list[str] = []  # lines of this turn of the loop, each with its newline
        self._soon = None  # the loop a write of the kept lines is due on

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(self.format(record))
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - as logging.StreamHandler: report, never raise into the caller
            self.handleError(record)

    def write(self, line: str) -> None:
        """Write one formatted line now (under the handler's lock, as ``emit`` is called)."""
        with self.lock:
            if self._kept:
                self._kept.append(line + "\n")
                self._write_kept()
            else:
                self.stream.write(line + "\n")
                if self._flush:
                    self.stream.flush()

    def write_soon(self, line: str) -> None:
        """Write one formatted line when this turn of the running event loop is over (now, outside a loop)."""
        loop = asyncio._get_running_loop()
        if loop is None:
            self.write(line)
            return
        with self.lock:
            self._kept.append(line + "\n")
            if self._soon is not loop:  # (a loop that closed before its turn was over leaves it to the next)
                self._soon = loop
                loop.call_soon(self._write_soon, context=_QUIET)

    def _write_soon(self) -> None:
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - as logging.StreamHandler: report, never raise into the loop
            self.handleError(logging.makeLogRecord({"msg": "access lines"}))

    def _write_kept(self) -> None:
        lines, self._kept, self._soon = self._kept, [], None
        self.stream.write("".join(lines))
        if self._flush:
            self.stream.flush()

    def flush(self) -> None:
        with self.lock:
            if self._kept:
                self._write_kept()
            elif self._flush and self.stream and hasattr(self.stream, "flush"):
                self.stream.flush()

    def close(self) -> None:
        try:
            self.flush()
        except (OSError, ValueError):  # a stream closed already: nothing more can be written
            pass
        super().close()


_QUIET = contextvars.Context()  # the context the loop runs LineHandler.flush in (none copied for each line)


class AccessLog:
    """The access line of each request, through ``logger``: the same line as ``logger.log(level, msg)`` writes.

    While logging is set up as ``setup_logging`` left it (the root's one ``LineHandler`` with its
    ``JsonFormatter``, no filters, no handler on the way), the line is put together and written straight away,
    without a ``LogRecord`` and the logging module's walk of levels, locks and handlers (a third of the cost of
    the line, and it runs for every request). Any other configuration (a test capturing records, a handler
    added) gets the record through ``logging`` as usual."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def log(self, level: int, msg: str) -> None:
        logger = self.logger
        if not logger.isEnabledFor(level):
            return
        handler = _direct(logger)
        if handler is None:
            logger.log(level, "%s", msg)
            return
        if level < handler.level:
            return
        try:
            handler.write_soon(handler.formatter.line(time.time(), logging.getLevelName(level), logger.name, msg))
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - as logging: report, never raise into the caller
            logger.log(level, "%s", msg)


def _direct(logger: logging.Logger) -> "LineHandler | None":
    """The ``LineHandler`` that alone would write ``logger``'s records unchanged, or None."""
    root = logging.root
    if logger.handlers or logger.filters or not logger.propagate or root.filters or len(root.handlers) != 1:
        return None
    parent = logger.parent
    while parent is not None and parent is not root:
        if parent.handlers or parent.filters or not parent.propagate:
            return None
        parent = parent.parent
    handler = root.handlers[0]
    if type(handler) is not LineHandler or handler.filters or type(handler.formatter) is not JsonFormatter:
        return None
    return handler


def setup_logging(service: str, level: str = "INFO", stream=None) -> None:
    service_var.set(service)
    handler = LineHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # what our lines never show is not collected for each record (the logging HOWTO's "Optimization"): the
    # caller's frame, thread, process and its multiprocessing name
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # tornado's access log is replaced by our own (bookshop.app.log_request)
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    # the driver's DEBUG command log prints whole documents (password hashes, the signing key): never
    logging.getLogger("pymongo").setLevel(max(root.level, logging.INFO))

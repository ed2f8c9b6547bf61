"""JSON log lines carrying the service, the request id and the trace of the request being served."""
from __future__ import annotations

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

    def _at(self, created: float) -> str:
        # the same text as datetime.isoformat(timespec="milliseconds") in UTC, its date part made once a second
        second = int(created)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        millis = min(999, round((created - second) * 1e6) // 1000)
        return f"{self._prefix}.{millis:03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        # put together by hand: json.dumps would build an encoder for each line (this runs for every request)
        out = ['{"at": "', self._at(record.created), '", "level": ', _quote(record.levelname.lower()),
               ', "logger": ', _quote(record.name)]
        service = getattr(record, "service", None) or service_var.get()
        if service is not None:
            out += (', "service": ', _quote(str(service)))
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id is not None:
            out += (', "request_id": ', _quote(str(request_id)))
        ids = trace_ids_var.get()
        if ids is None:  # not in a request: a span made current some other way, or none
            span = trace.get_current_span().get_span_context()
            if span.is_valid:
                ids = (format(span.trace_id, "032x"), format(span.span_id, "016x"))
        if ids is not None:
            out += (', "trace_id": "', ids[0], '", "span_id": "', ids[1], '"')
        out += (', "msg": ', _quote(record.getMessage()))
        if record.exc_info:
            out += (', "exc": ', _quote(self.formatException(record.exc_info)))
        out.append("}")
        return "".join(out)


class LineHandler(logging.StreamHandler):
    """A ``StreamHandler`` that writes each line in one call, and flushes only a stream that does not write
    through by itself (stderr does): one line per request."""

    def __init__(self, stream):
        super().__init__(stream)
        self._flush = not (getattr(stream, "write_through", False) or getattr(stream, "line_buffering", False))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
            if self._flush:
                self.stream.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - as logging.StreamHandler: report, never raise into the caller
            self.handleError(record)


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

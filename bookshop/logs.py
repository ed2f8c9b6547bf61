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

_encoder = json.JSONEncoder(default=str)  # json.dumps(..., default=str) would build one per line


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
        entry = {
            "at": self._at(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "service": getattr(record, "service", None) or service_var.get(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        entry["msg"] = record.getMessage()
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _encoder.encode({k: v for k, v in entry.items() if v is not None})


def setup_logging(service: str, level: str = "INFO", stream=None) -> None:
    service_var.set(service)
    handler = logging.StreamHandler(stream or sys.stderr)
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

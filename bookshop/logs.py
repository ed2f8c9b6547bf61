"""JSON log lines carrying the request id of the request being served."""
from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
service_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("service", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "at": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "service": getattr(record, "service", None) or service_var.get(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps({k: v for k, v in entry.items() if v is not None}, default=str)


def setup_logging(service: str, level: str = "INFO", stream=None) -> None:
    service_var.set(service)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # tornado's access log is replaced by our own (bookshop.app.log_request)
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    # the driver's DEBUG command log prints whole documents (password hashes, the signing key): never
    logging.getLogger("pymongo").setLevel(max(root.level, logging.INFO))

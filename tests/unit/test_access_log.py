"""The access line written without a LogRecord is the line logging would write, and any other logging set-up
(a handler added, a filter, a level) still gets its record."""
from __future__ import annotations

import contextvars
import io
import json
import logging

import pytest

from bookshop import tracing
from bookshop.logs import AccessLog, service_var, setup_logging

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def root_saved():
    root = logging.getLogger()
    handlers, level, service = root.handlers[:], root.level, service_var.get()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    service_var.set(service)


def _in_request(fn):
    def run():
        tracing.start_request({"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"}, "GET", "/", "/")
        from bookshop.logs import request_id_var
        request_id_var.set("req-1")
        fn()
    contextvars.copy_context().run(run)


def test_the_direct_line_is_the_line_logging_writes(root_saved):
    stream = io.StringIO()
    setup_logging("gateway", "INFO", stream)
    logger = logging.getLogger("bookshop.access.probe")
    _in_request(lambda: (AccessLog(logger).log(logging.INFO, "GET /x 200 1.2ms"),
                         logger.info("%s", "GET /x 200 1.2ms")))
    direct, logged = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert direct.pop("at")[:16] == logged.pop("at")[:16]
    assert direct == logged == {"level": "info", "logger": "bookshop.access.probe", "service": "gateway",
                                "request_id": "req-1", "trace_id": TRACE, "span_id": direct["span_id"],
                                "msg": "GET /x 200 1.2ms"}


def test_levels_below_the_loggers_write_nothing(root_saved):
    stream = io.StringIO()
    setup_logging("gateway", "INFO", stream)
    AccessLog(logging.getLogger("bookshop.access.probe")).log(logging.DEBUG, "GET /healthz 200 0.1ms")
    assert stream.getvalue() == ""


def test_another_set_up_gets_the_record(root_saved, caplog):
    setup_logging("gateway", "INFO", io.StringIO())
    logging.getLogger().addHandler(caplog.handler)  # a second handler on the root, as a test's capture adds
    _in_request(lambda: AccessLog(logging.getLogger("bookshop.access.probe")).log(logging.WARNING, "GET /x 500"))
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("bookshop.access.probe", logging.WARNING, "GET /x 500")]

"""The access line written without a LogRecord is the line logging would write, and any other logging set-up
(a handler added, a filter, a level) still gets its record."""
from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging

import pytest
from harness import run

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


class CountingStream(io.StringIO):
    """A stream that counts its write() calls (stderr into a file: one system call each)."""
    write_through = True

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text):
        self.writes += 1
        return super().write(text)


def test_in_a_loop_the_access_lines_of_a_turn_are_one_write_at_its_end(root_saved):
    stream = CountingStream()
    setup_logging("gateway", "INFO", stream)
    access = AccessLog(logging.getLogger("bookshop.access.probe"))

    async def scenario():
        for n in range(3):
            access.log(logging.INFO, f"GET /x 200 {n}ms")
        kept = stream.getvalue()
        await asyncio.sleep(0)  # the turn is over
        return kept
    kept = run(scenario())
    assert kept == "" and stream.writes == 1
    assert [json.loads(line)["msg"] for line in stream.getvalue().splitlines()] == [
        "GET /x 200 0ms", "GET /x 200 1ms", "GET /x 200 2ms"]


def test_any_other_line_and_flush_write_the_kept_lines_first(root_saved):
    stream = CountingStream()
    setup_logging("gateway", "INFO", stream)
    access = AccessLog(logging.getLogger("bookshop.access.probe"))
    other = logging.getLogger("bookshop.probe")

    async def scenario():
        access.log(logging.INFO, "GET /a 200")
        other.warning("between")  # written at once, after the line kept before it
        access.log(logging.INFO, "GET /b 200")
        logging.getLogger().handlers[0].flush()  # as logging.shutdown() at exit
        return [json.loads(line)["msg"] for line in stream.getvalue().splitlines()]
    assert run(scenario()) == ["GET /a 200", "between", "GET /b 200"]


def test_a_line_kept_by_a_loop_that_closed_is_written_with_the_next_loops_lines(root_saved):
    stream = io.StringIO()
    setup_logging("gateway", "INFO", stream)
    access = AccessLog(logging.getLogger("bookshop.access.probe"))
    loop = asyncio.new_event_loop()

    def first():
        access.log(logging.INFO, "GET /first 200")
        loop.stop()  # the loop ends with this turn: the write due after it never runs there
    loop.call_soon(first)
    loop.run_forever()
    loop.close()
    assert stream.getvalue() == ""

    async def second():
        access.log(logging.INFO, "GET /second 200")
        await asyncio.sleep(0)
    run(second())
    assert [json.loads(line)["msg"] for line in stream.getvalue().splitlines()] == ["GET /first 200", "GET /second 200"]


def test_a_forked_service_writes_its_kept_lines_before_it_exits(root_saved):
    # the supervisor's child ends with os._exit (no atexit, no logging.shutdown): it flushes the root's handlers
    from bookshop import supervisor
    stream = io.StringIO()
    setup_logging("gateway", "INFO", stream)

    async def scenario():
        AccessLog(logging.getLogger("bookshop.access.probe")).log(logging.INFO, "GET /last 200")
        supervisor._flush_logs()
        return stream.getvalue()
    assert json.loads(run(scenario()))["msg"] == "GET /last 200"


def test_the_time_of_a_line_is_isoformat_in_milliseconds_however_often_it_is_asked():
    import datetime

    from bookshop.logs import JsonFormatter
    formatter = JsonFormatter()
    base = 1764680000.0
    for created in (base + 0.0004, base + 0.0004, base + 0.0011, base + 0.0011, base + 0.9994, base + 1.5,
                    base + 1.5004, base + 0.25, base + 86400.123456):
        expected = datetime.datetime.fromtimestamp(created, datetime.timezone.utc).isoformat(timespec="milliseconds")
        assert formatter._at(created) == expected, created

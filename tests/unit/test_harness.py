"""The test harness's own helpers, where a fault in them would show as another test's failure."""
from __future__ import annotations

import gc
import socket
import warnings

import harness
from bookshop import SERVICES


def test_a_port_range_that_is_taken_is_skipped_and_every_socket_tried_is_closed(monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        last = max(SERVICES.values())
        crowded = port - last  # its last service's port is taken: the ones before it bind, that one fails
        bases = iter([crowded, crowded + 1000])
        monkeypatch.setattr(harness.random, "randrange", lambda *_: next(bases))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert harness.free_base() == crowded + 1000
            gc.collect()
        assert not [w for w in seen if issubclass(w.category, ResourceWarning)], [str(w.message) for w in seen]
    finally:
        taken.close()


def test_no_test_runs_a_coroutine_with_asyncio_run():
    """``asyncio.run`` sets the global loop to None when it ends, dropping the one another test had set; that
    loop's unclosed sockets then fail whichever test is running when it is collected (seen in CI). Tests use
    ``harness.run``, a private loop that leaves the global one alone."""
    import ast
    import pathlib
    found = []
    for path in sorted(pathlib.Path(harness.ROOT, "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "run" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "asyncio":
                found.append(f"{path.relative_to(harness.ROOT)}:{node.lineno}")
    assert found == []

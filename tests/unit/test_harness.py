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

"""Session fixtures: one database and one running shop shared by the tests that don't need their own."""
from __future__ import annotations

import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import Shop  # noqa: E402

from bookshop.embedded_db import EmbeddedDatabase  # noqa: E402


@pytest.fixture(scope="session")
def mongodb_uri():
    uri = os.environ.get("MONGODB_URI")
    if uri:
        yield uri
        return
    db = EmbeddedDatabase(":memory:")
    yield db.start()
    db.stop()


@pytest.fixture(scope="session")
def log_dir():
    path = os.environ.get("BOOKSHOP_TEST_LOGS") or tempfile.mkdtemp(prefix="bookshop-test-logs-")
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def shop(mongodb_uri, log_dir):
    """The shared shop: all seven services with default settings and no demo data."""
    s = Shop(mongodb_uri, log_dir=log_dir).start()
    yield s
    s.stop()


@pytest.fixture
def make_shop(mongodb_uri, log_dir):
    """A shop of the test's own, with settings overridden (e.g. a short reservation TTL)."""
    shops = []

    def make(env=None, services=None):
        s = Shop(mongodb_uri, env=env, log_dir=log_dir)
        shops.append(s)  # before start(): a shop that never got ready is stopped too
        s.start(*(services or ()))
        return s
    yield make
    for s in shops:
        s.stop()


@pytest.fixture
def private_mongodb_uri(mongodb_uri):
    """A database server of the test's own (unless MONGODB_URI points at a real one): for load tests that
    must not share the embedded server's single core with what earlier tests left behind."""
    if os.environ.get("MONGODB_URI"):
        yield mongodb_uri
        return
    db = EmbeddedDatabase(":memory:")
    yield db.start()
    db.stop()

"""Connecting to MongoDB (or the embedded SecantusDB) and the helpers every repository shares."""
from __future__ import annotations

import logging
from typing import Awaitable, Callable, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pymongo.errors
from motor.motor_asyncio import AsyncIOMotorClient

from bookshop import tracing
from bookshop.errors import is_unavailable  # noqa: F401 (storage's callers name it here too)
from bookshop.services.errors import Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

DuplicateKeyError = pymongo.errors.DuplicateKeyError


def with_required_options(uri: str) -> str:
    """The URI with ``retryWrites=false&journal=true&serverMonitoringMode=poll`` unless the caller chose
    otherwise.

    Retryable writes collapse the embedded server's write rate after ~10k writes; without journal the last
    acknowledged writes can vanish on kill -9. A streaming monitor (the driver's default) keeps a ``hello``
    open on the server, which the embedded server answers by waking every 0.25 s per client, and a second
    connection for round-trip times: half of an idle shop's database CPU. Polling asks once per heartbeat (10 s).
    """
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    query.setdefault("retryWrites", "false")
    query.setdefault("journal", "true")
    query.setdefault("serverMonitoringMode", "poll")
    return urlunsplit(parts._replace(query=urlencode(query)))


class Database:
    """One service's database: a motor client and the database named after the service."""

    def __init__(self, uri: str, name: str, server_selection_ms: int = 2000):
        # commands are spans of the request that sent them while spans are exported (tracing.MongoSpans)
        self.client = AsyncIOMotorClient(with_required_options(uri), serverSelectionTimeoutMS=server_selection_ms,
                                         connectTimeoutMS=2000, tz_aware=True, maxPoolSize=100,
                                         event_listeners=tracing.mongo_listeners())
        self.db = self.client[name]
        self.name = name
        self._after_commit: dict[int, list[Callable[[], None]]] = {}  # by id() of a running transaction's session

    def __getitem__(self, collection: str):
        return self.db[collection]

    async def ping(self) -> bool:
        try:
            await self.client.admin.command("ping")
            return True
        except pymongo.errors.PyMongoError:
            return False

    async def transaction(self, work: Callable[[object], Awaitable[T]]) -> T:
        """Run ``work(session)`` in a multi-document transaction, retried on transient conflicts; then the
        callbacks ``work`` registered with ``after_commit`` (not when it fails)."""
        try:
            async with await self.client.start_session() as session:
                callbacks = self._after_commit[id(session)] = []
                try:
                    result = await session.with_transaction(work)
                finally:
                    del self._after_commit[id(session)]
        except pymongo.errors.PyMongoError as exc:
            if is_unavailable(exc):
                raise Unavailable("database unavailable", retry_after=2) from exc
            raise
        for callback in callbacks:
            callback()
        return result

    def after_commit(self, session, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the transaction of ``session`` has committed (at once outside of one)."""
        callbacks = self._after_commit.get(id(session))
        if callbacks is None:
            callback()
        elif callback not in callbacks:
            callbacks.append(callback)

    def close(self) -> None:
        self.client.close()

"""Recognising a database outage, for the layers that answer it (storage re-raises it as ``Unavailable``;
the base handler maps one that escaped a repository to a 503).

The domain's own errors are ``bookshop.services.errors``. This module only *classifies* an exception by the
driver's types: it imports ``pymongo.errors`` and makes no driver call (every call stays in
``bookshop/storage``), so a handler can tell an outage from a bug without importing storage.
"""
from __future__ import annotations

import pymongo.errors

#: the driver's exceptions that mean "the database cannot be reached", not "the request was wrong"
OUTAGES = (pymongo.errors.ConnectionFailure, pymongo.errors.ServerSelectionTimeoutError,
           pymongo.errors.NetworkTimeout, pymongo.errors.AutoReconnect)


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means the database cannot be reached (a 503, not a bug)."""
    return isinstance(exc, OUTAGES)

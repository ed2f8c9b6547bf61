"""The shop's clock: the one ``utcnow`` that use cases and handlers read (tests pass their own)."""
from __future__ import annotations

import datetime


def utcnow() -> datetime.datetime:
    """Now, timezone-aware UTC."""
    return datetime.datetime.now(datetime.timezone.utc)

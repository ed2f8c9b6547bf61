"""Channels and who may read them (pure rules, unit-tested)."""
from __future__ import annotations

import dataclasses

from bookshop.auth import Principal

# channel -> the service stream it is cut from
CHANNELS = {
    "inventory": "inventory",
    "books": "catalog",
    "orders": "orders",
    "orders:mine": "orders",
}


class ChannelError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class Filter:
    """Which events of the stream a subscriber gets (``orders:mine``: only their own)."""
    user_id: str | None = None

    def matches(self, event: dict) -> bool:
        return self.user_id is None or event.get("user_id") == self.user_id


def authorize(channel: str, principal: Principal | None) -> Filter:
    if channel not in CHANNELS:
        raise ChannelError("unknown_channel", f"no channel {channel!r}")
    if channel in ("inventory", "books"):
        return Filter()
    if principal is None:
        raise ChannelError("forbidden", f"sign in to read {channel}")
    if channel == "orders":
        if principal.role != "staff":
            raise ChannelError("forbidden", "only staff may read every order")
        return Filter()
    if principal.role not in ("customer", "staff"):
        raise ChannelError("forbidden", "sign in as a customer to read your orders")
    return Filter(user_id=principal.sub)


def private(channel: str) -> bool:
    return channel in ("orders", "orders:mine")


def parse_message(raw: str | bytes) -> dict:
    """Validate one client frame: ``auth``, ``subscribe`` or ``unsubscribe``."""
    import json
    if isinstance(raw, bytes):
        raise ChannelError("bad_message", "send JSON text frames")
    try:
        msg = json.loads(raw)
    except ValueError:
        raise ChannelError("bad_message", "not JSON") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ChannelError("bad_message", "a message is an object with an 'op'")
    op = msg["op"]
    allowed = {"auth": {"op", "token"}, "subscribe": {"op", "channel", "after"},
               "unsubscribe": {"op", "channel"}}
    if op not in allowed:
        raise ChannelError("bad_message", f"unknown op {op!r}")
    extra = set(msg) - allowed[op]
    if extra:
        raise ChannelError("bad_message", f"unknown field {sorted(extra)[0]!r}")
    if op == "auth" and not isinstance(msg.get("token"), str):
        raise ChannelError("bad_message", "auth needs a token string")
    if op in ("subscribe", "unsubscribe") and not isinstance(msg.get("channel"), str):
        raise ChannelError("bad_message", f"{op} needs a channel")
    if op == "subscribe" and "after" in msg:
        after = msg["after"]
        if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < 0):
            raise ChannelError("bad_message", "after must be a non-negative integer seq")
    return msg

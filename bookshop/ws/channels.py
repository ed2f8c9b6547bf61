"""Channels, who may read them, and what a client may send (pure rules, unit-tested)."""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Callable

from bookshop.auth import Principal
from bookshop.services.errors import InvalidInput
from bookshop.validation import parse_json

# an epoch as the services make them (random ids); anything else is no epoch of ours
EPOCH = re.compile(r"[A-Za-z0-9_-]{1,64}")

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


def check_known(channel: str) -> None:
    if channel not in CHANNELS:
        raise ChannelError("unknown_channel", f"no channel {channel!r}")


def authorize(channel: str, principal: Principal | None) -> Filter:
    check_known(channel)
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


#: the channels that need a signed-in reader (and end when their token does)
PRIVATE = frozenset({"orders", "orders:mine"})


def private(channel: str) -> bool:
    return channel in PRIVATE


def parse_message(raw: str | bytes) -> dict:
    """Validate one client frame: ``auth``, ``subscribe`` or ``unsubscribe``.

    The JSON rules are the HTTP API's (``parse_json``): no NaN, no ``$`` keys, at most ``MAX_DEPTH`` levels."""
    if isinstance(raw, bytes):
        raise ChannelError("bad_message", "send JSON text frames")
    if not raw:
        raise ChannelError("bad_message", "malformed JSON: an empty frame")
    try:
        msg = parse_json(raw)
    except InvalidInput as exc:
        raise ChannelError("bad_message", exc.message) from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ChannelError("bad_message", "a message is an object with an 'op'")
    op = msg["op"]
    allowed = {"auth": {"op", "token"}, "subscribe": {"op", "channel", "after", "epoch"},
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
    if op == "subscribe" and msg.get("epoch") is not None and not valid_epoch(msg["epoch"]):
        raise ChannelError("bad_message", "epoch must be the epoch of an earlier subscribed or snapshot frame")
    return msg


def valid_epoch(value) -> bool:
    """Could ``value`` be a stream's epoch? (Any such string may be sent: one that is not the stream's
    current epoch gets a fresh snapshot.)"""
    return isinstance(value, str) and EPOCH.fullmatch(value) is not None


class MessageBudget:
    """How many frames a socket may still send: a token bucket of ``burst`` frames, refilled at ``rate`` a
    second. A client past it is flooding (it is closed with 1008); 20/s is far above what a dashboard needs."""

    __slots__ = ("rate", "burst", "tokens", "at", "clock")

    RATE = 20.0
    BURST = 200

    def __init__(self, rate: float = RATE, burst: int = BURST, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.at = clock()

    def take(self) -> bool:
        """Spend one frame's worth; False when the budget is spent."""
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

"""Work that goes on in the background until the service stops: the one loop and the one back-off.

A pass that raises is logged and the loop goes on (a database or an upstream down must not end a sweep or a
follower); the pause between passes ends early when the service stops."""
from __future__ import annotations

import asyncio
import logging
import random
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


async def pause(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds``, or less if ``stop`` is set meanwhile; whether it is."""
    try:
        await asyncio.wait_for(stop.wait(), max(0.0, seconds))
    except asyncio.TimeoutError:
        pass
    return stop.is_set()


async def pause_until(stop: asyncio.Event, other: asyncio.Event | None, seconds: float | None) -> None:
    """Wait until ``stop`` or ``other`` is set, or ``seconds`` have passed (None: no limit)."""
    waits = [asyncio.ensure_future(e.wait()) for e in (stop, other) if e is not None]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()


class Backoff:
    """Jittered exponential back-off: ``first`` seconds, doubled after each wait up to ``cap``, each wait
    drawn between half and one and a half times that (so many clients do not come back in step)."""

    def __init__(self, first: float = 0.2, cap: float = 5.0, rng: Callable[[], float] = random.random):
        self.first = first
        self.cap = cap
        self._rng = rng
        self._next = first

    def reset(self) -> None:
        self._next = self.first

    def wait(self) -> float:
        seconds = self._next * (0.5 + self._rng())
        self._next = min(self._next * 2, self.cap)
        return seconds


async def repeat(stop: asyncio.Event, one_pass: Callable[[], Awaitable[float]], name: str,
                 after_failure: Callable[[], float]) -> None:
    """Run ``one_pass`` until ``stop`` is set, each time waiting the seconds it returned (0: at once) or, after
    a pass that raised, ``after_failure()`` seconds."""
    while not stop.is_set():
        try:
            wait = await one_pass()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a background job must survive a bad pass (db down, ...)
            log.warning("%s: %s", name, exc)
            wait = after_failure()
        if wait > 0 and await pause(stop, wait):
            return


async def every(stop: asyncio.Event, seconds: float, work: Callable[[], Awaitable[object]], name: str) -> None:
    """``work()`` every ``seconds`` until ``stop`` is set (what it returns is not looked at)."""
    async def one_pass() -> float:
        await work()
        return seconds
    await repeat(stop, one_pass, f"{name} pass failed", lambda: seconds)

"""The one background loop and its back-off (bookshop/services/periodic.py)."""
from __future__ import annotations

import asyncio

from harness import run

from bookshop.services.periodic import Backoff, every, repeat


def test_the_backoff_doubles_to_its_cap_with_jitter_and_starts_again_after_a_reset():
    low = Backoff(0.2, 1.0, rng=lambda: 0.0)
    assert [round(low.wait(), 3) for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    low.reset()
    assert low.wait() == 0.1
    high = Backoff(0.2, 1.0, rng=lambda: 1.0)
    assert [round(high.wait(), 3) for _ in range(2)] == [0.3, 0.6]


def test_a_failing_pass_is_logged_and_the_loop_goes_on_until_stopped(caplog):
    async def scenario():
        stop = asyncio.Event()
        passes = []

        async def one_pass() -> float:
            passes.append(len(passes))
            if len(passes) == 2:
                raise RuntimeError("database down")
            if len(passes) == 4:
                stop.set()
            return 0
        await asyncio.wait_for(repeat(stop, one_pass, "sweeping", lambda: 0), 5)
        return passes
    assert run(scenario()) == [0, 1, 2, 3]
    assert "sweeping: database down" in caplog.text


def test_every_waits_its_period_and_a_stop_ends_the_wait():
    async def scenario():
        stop = asyncio.Event()
        calls = []

        async def work():
            calls.append(True)
            return 5  # not a pause: every() keeps its period
        task = asyncio.ensure_future(every(stop, 3600, work, "sweep"))
        while not calls:
            await asyncio.sleep(0)
        stop.set()
        await asyncio.wait_for(task, 5)  # ends at once, not an hour later
        return calls
    assert run(scenario()) == [True]

"""``LoadGen.check``: a cancelled order's stock comes back after its status says CANCELLED (the compensation
follows the transition), so the conservation check waits for it within the settling time, and no longer."""
from __future__ import annotations

from harness import run

from bookshop.loadgen import LoadGen

ISBN = "9780000000001"
ORDER = {"id": "o1", "status": "CANCELLED", "user_id": "u1", "total_cents": 1000, "items": [
    {"isbn": ISBN, "quantity": 1}], "payment": {"status": "refunded"}, "history": [{"status": "CANCELLED"}]}


class Staff:
    async def call(self, route, method, path, *args, **kwargs):
        return 200, [{"kind": "charge", "amount_cents": 1000}, {"kind": "refund", "amount_cents": 1000}]


def loadgen(levels: list[dict], settle: float) -> LoadGen:
    shop = LoadGen("http://127.0.0.1:9", users=1, duration=1, staff_email="s@x", staff_password="p",
                   settle=settle, progress=False)
    shop.isbns = [ISBN]
    shop.initial = {ISBN: {"on_hand": 5, "reserved": 0}}
    reads = iter(levels)

    async def orders_of_run(staff):
        return [ORDER]

    async def read_levels(staff, isbns):
        level = next(reads, levels[-1])
        return {ISBN: level}
    shop._orders_of_run, shop._levels = orders_of_run, read_levels
    return shop


def test_stock_given_back_after_the_cancel_is_waited_for():
    held = {"on_hand": 5, "reserved": 1, "available": 4}
    back = {"on_hand": 5, "reserved": 0, "available": 5}
    invariants, problems = run(loadgen([held, held, back], settle=10).check(Staff()))
    assert invariants["stock_conserved"] and not problems


def test_stock_that_never_comes_back_is_named_once_the_settling_time_is_up():
    held = {"on_hand": 5, "reserved": 1, "available": 4}
    invariants, problems = run(loadgen([held], settle=1).check(Staff()))
    assert not invariants["stock_conserved"]
    assert problems == [f"stock_conserved: {ISBN} expected on_hand 5 reserved 0, "
                        f"found {{'on_hand': 5, 'reserved': 1}}"]

"""``python run.py loadgen``: a mixed load against a real shop ends with every invariant checked through the
public API, and a shop that breaks one (stock changed behind the API's back) is caught and named."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import aiohttp
import pymongo
import pytest

from client import Api
from harness import ROOT, RUN_PY


async def stocked_shop(make_shop, books: int = 6) -> tuple[object, list[str]]:
    shop = make_shop()
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbns = [await api.new_book(staff, stock=40, price_cents=900 + 100 * i) for i in range(books)]
    return shop, isbns


async def loadgen(shop, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, RUN_PY, "loadgen", "--url", shop.url(), "--no-progress", "--seed", "7", *args,
        env=shop.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)


def summary_of(out: bytes) -> dict:
    return json.loads(out.decode().strip().splitlines()[-1])


@pytest.mark.gen_test(timeout=120)
async def test_a_short_run_holds_every_invariant(make_shop):
    shop, _ = await stocked_shop(make_shop)
    proc = await loadgen(shop, "--users", "4", "--duration", "4", "--settle", "30")
    out, err = await asyncio.wait_for(proc.communicate(), 100)
    assert proc.returncode == 0, (out.decode()[-3000:], err.decode()[-3000:])
    summary = summary_of(out)
    assert set(summary) == {"requests", "orders_confirmed", "errors", "latency_ms", "invariants"}
    assert summary["invariants"] and all(summary["invariants"].values())
    assert set(summary["invariants"]) == {"no_stock_below_zero", "stock_conserved", "confirmed_charged_once",
                                          "cancelled_not_charged", "nothing_left_pending"}
    assert summary["requests"] > 20 and summary["orders_confirmed"] > 0
    assert {"p50", "p99"} <= set(summary["latency_ms"]["POST /orders"])
    assert "invariants:" in out.decode() and "POST /orders" in out.decode()


@pytest.mark.gen_test(timeout=120)
async def test_stock_changed_behind_the_api_s_back_breaks_conservation_and_is_named(make_shop):
    shop, isbns = await stocked_shop(make_shop)
    proc = await loadgen(shop, "--users", "3", "--duration", "5", "--settle", "15")
    # once the run is under way (its first order exists), add copies directly in the inventory database
    async with aiohttp.ClientSession() as session:
        staff = await Api(shop, session).staff()
        deadline = asyncio.get_running_loop().time() + 30
        while not (await staff.get("/orders")).body["items"]:
            assert asyncio.get_running_loop().time() < deadline, "loadgen placed no order"
            await asyncio.sleep(0.1)
    client = pymongo.MongoClient(shop.mongodb_uri, serverSelectionTimeoutMS=3000)
    try:
        levels = client[f"{shop.prefix}_inventory"]["levels"]
        assert levels.update_one({"_id": isbns[0]}, {"$inc": {"on_hand": 7, "available": 7}}).matched_count == 1
    finally:
        client.close()
    out, err = await asyncio.wait_for(proc.communicate(), 100)
    assert proc.returncode == 1, (out.decode()[-3000:], err.decode()[-3000:])
    summary = summary_of(out)
    assert summary["invariants"]["stock_conserved"] is False
    assert summary["invariants"]["no_stock_below_zero"] is True
    assert f"stock_conserved: {isbns[0]}" in out.decode()


def test_loadgen_without_staff_credentials_says_what_it_needs():
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOKSHOP_ADMIN_")}
    proc = subprocess.run([sys.executable, RUN_PY, "loadgen", "--duration", "1"], env=env, capture_output=True,
                          timeout=30, cwd=ROOT)
    assert proc.returncode == 2
    assert b"BOOKSHOP_ADMIN_EMAIL" in proc.stderr

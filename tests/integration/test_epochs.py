"""Stream epochs as a client sees them: every ``subscribed``/``snapshot`` frame and every long-poll answer names
the history its seqs are in, and a position of another history (a recreated database, ``run.py new-epoch``,
a seq beyond the head or older than the log keeps) gets a fresh snapshot, or ``reset: true``, never another
history's numbers. Destructive steps (dropping a database, a new epoch) run against a shop of this module's
own."""
from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import uuid

import aiohttp
import pytest
from motor.motor_asyncio import AsyncIOMotorClient

from client import Api
from harness import RUN_PY, Shop

EPOCH = re.compile(r"[A-Za-z0-9_-]{1,64}")


# -- helpers ------------------------------------------------------------------------------------------------

async def connect(session: aiohttp.ClientSession, shop):
    return await session.ws_connect(shop.ws_url, headers={"Origin": shop.origin})


async def read_until(ws, predicate, timeout: float = 15.0) -> list[dict]:
    """Frames up to and including the first one ``predicate`` accepts."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    frames = []
    while True:
        msg = await ws.receive(max(0.01, deadline - loop.time()))
        assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg.type} {msg.data!r}"
        frames.append(json.loads(msg.data))
        if predicate(frames[-1]):
            return frames


async def subscribe(ws, channel: str) -> list[dict]:
    """A fresh subscription: the ``subscribed`` and ``snapshot`` frames."""
    await ws.send_json({"op": "subscribe", "channel": channel})
    frames = await read_until(ws, lambda f: f.get("channel") == channel and f["type"] in ("snapshot", "error"))
    assert [f["type"] for f in frames] == ["subscribed", "snapshot"], frames
    return frames


async def restock(api: Api, isbn: str, quantity: int = 1) -> dict:
    r = await api.post(f"/inventory/{isbn}/restock", {"quantity": quantity})
    assert r.status == 200, r
    return r.body


async def in_thread(fn, *args):
    """The harness blocks (it starts and waits for processes): keep the test's loop and sockets running."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


@pytest.fixture(scope="module")
def own_shop(mongodb_uri, log_dir):
    s = Shop(mongodb_uri, log_dir=log_dir).start()
    yield s
    s.stop()


def database(shop, service: str):
    client = AsyncIOMotorClient(shop.mongodb_uri, tz_aware=True)
    return client, client[f"{shop.prefix}_{service}"]


async def poll(api: Api, **params) -> dict:
    r = await api.get("/events", params={k: str(v) for k, v in params.items()})
    assert r.status == 200, r
    assert set(r.body) == {"items", "seq", "epoch", "reset"}, r.body
    return r.body


async def numbered(api: Api, channel: str, isbns: set[str]) -> None:
    """Wait until the events of the books ``isbns`` are in the channel's log (numbered a moment after the
    answers to the writes that made them)."""
    page = await poll(api, channel=channel, after=0, limit=500)
    seen = {e["data"]["isbn"] for e in page["items"]}
    while not isbns <= seen:
        page = await poll(api, channel=channel, after=page["seq"], wait=5)
        seen |= {e["data"]["isbn"] for e in page["items"]}


def snapshot_of(channel: str, epoch: str | None = None):
    """Accepts the snapshot of ``channel`` (in another epoch than ``epoch``, when given)."""
    return lambda f: f["type"] == "snapshot" and f["channel"] == channel and (epoch is None or f["epoch"] != epoch)


def book_created(isbn: str):
    return lambda f: f["type"] == "event" and f["event"] == "book.created" and f["data"]["isbn"] == isbn


# -- the event log's epoch, in the database -----------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_a_log_gets_its_epoch_once_keeps_it_across_restarts_and_a_recreated_database_gets_another(
        mongodb_uri):
    from bookshop.storage.mongo import Database
    from bookshop.storage.outbox import EventLog
    name = "epochs_" + uuid.uuid4().hex[:10]
    db = Database(mongodb_uri, name)
    try:
        # instances starting together on a new database agree on one epoch
        epochs = await asyncio.gather(*(EventLog(db).epoch() for _ in range(10)))
        first = epochs[0]
        assert set(epochs) == {first} and EPOCH.fullmatch(first)
        await EventLog(db).create_indexes()  # the set-up of a restarted instance keeps it
        assert {await EventLog(db).epoch() for _ in range(3)} == {first}
        assert await db["meta"].find_one({"_id": "epoch"}, {"_id": 0, "value": 1}) == {"value": first}

        replaced = await EventLog(db).new_epoch()  # run.py new-epoch
        assert EPOCH.fullmatch(replaced) and replaced != first
        assert await EventLog(db).epoch() == replaced

        await db.client.drop_database(name)  # recreated: set up again, another history
        await EventLog(db).create_indexes()
        again = await EventLog(db).epoch()
        assert again not in (first, replaced)
    finally:
        await db.client.drop_database(name)
        db.close()


# -- the shared shop: nothing is reset ----------------------------------------------------------------------

@pytest.mark.gen_test(timeout=60)
async def test_a_resume_in_its_epoch_gets_the_events_and_one_of_another_history_a_fresh_snapshot(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff)
        ws = await connect(session, shop)
        subscribed, snapshot = await subscribe(ws, "inventory")
        epoch = subscribed["epoch"]
        assert EPOCH.fullmatch(epoch) and snapshot["epoch"] == epoch
        await restock(staff, isbn)
        last = (await read_until(ws, lambda f: f["type"] == "event" and f["data"]["isbn"] == isbn))[-1]["seq"]
        await ws.close()
        await restock(staff, isbn)

        ws = await connect(session, shop)
        await ws.send_json({"op": "subscribe", "channel": "inventory", "after": last, "epoch": epoch})
        frames = await read_until(ws, lambda f: f["type"] == "event" and f["data"]["isbn"] == isbn)
        assert frames[0] == {"type": "subscribed", "channel": "inventory", "seq": frames[0]["seq"], "epoch": epoch}
        assert "snapshot" not in [f["type"] for f in frames]
        assert frames[-1]["data"]["on_hand"] == 2 and frames[-1]["seq"] > last

        for resume in ({"after": last, "epoch": "a0other0history"},   # another epoch: its seqs mean nothing here
                       {"after": 2**40},                              # beyond the head (another shop's seq)
                       {"after": 2**40, "epoch": epoch}):
            await ws.send_json({"op": "subscribe", "channel": "inventory", **resume})
            frames = await read_until(ws, snapshot_of("inventory"))
            assert [f["type"] for f in frames] == ["subscribed", "snapshot"], (resume, frames)
            assert frames[0]["epoch"] == frames[1]["epoch"] == epoch
            assert frames[1]["seq"] >= last + 1 and isinstance(frames[1]["data"]["items"], list)
        await ws.send_json({"op": "subscribe", "channel": "inventory", "after": last, "epoch": "not an epoch"})
        error = (await read_until(ws, lambda f: f["type"] == "error"))[-1]
        assert error["code"] == "bad_message" and "epoch" in error["message"]
        await ws.close()


@pytest.mark.gen_test(timeout=60)
async def test_the_long_poll_names_its_epoch_and_says_when_the_client_must_read_the_state_again(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff)
        now = await poll(api, channel="inventory", after=2**40)  # beyond the head: start again from the head
        assert now["reset"] is True and now["items"] == [] and EPOCH.fullmatch(now["epoch"])
        head, epoch = now["seq"], now["epoch"]
        await restock(staff, isbn)
        page = await poll(api, channel="inventory", after=head, epoch=epoch, wait=10)
        while not [e for e in page["items"] if e["data"]["isbn"] == isbn]:  # the shared shop is busy
            page = await poll(api, channel="inventory", after=page["seq"], epoch=epoch, wait=10)
        assert page["reset"] is False and page["epoch"] == epoch and page["seq"] == page["items"][-1]["seq"]

        other = await poll(api, channel="inventory", after=head, epoch="a0other0history")
        assert other["reset"] is True and other["items"] == [] and other["epoch"] == epoch
        assert other["seq"] >= page["seq"]  # go on from the head, once the state is read
        without = await poll(api, channel="inventory", after=head)  # no epoch: taken to be the current one
        assert without["reset"] is False and without["items"]
        for bad in ("", "not an epoch", "x" * 65):
            r = await api.get("/events", params={"channel": "inventory", "epoch": bad})
            assert r.status == 400 and r.body["error"]["code"] == "invalid_field", r
            assert r.body["error"]["details"]["field"] == "epoch"


# -- a shop of this module's own: histories are reset ----------------------------------------------------------

@pytest.mark.gen_test(timeout=120)
async def test_a_resume_from_before_the_retention_is_told_to_read_the_state_again(own_shop):
    shop = own_shop
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbn = await api.new_book(staff)
        for _ in range(3):
            await restock(staff, isbn)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:  # the restocks' events are numbered a moment after their answers
            first = await poll(api, channel="inventory", after=0, wait=5)
            assert first["reset"] is False, first
            if len(first["items"]) >= 3:
                break
            assert loop.time() < deadline, first
        kept_from = first["items"][-1]["seq"]
        client, db = database(shop, "inventory")
        try:
            await db["events"].delete_many({"seq": {"$lt": kept_from}})  # what the 48 h TTL does
        finally:
            client.close()
        gone = await poll(api, channel="inventory", after=0, epoch=first["epoch"])
        assert gone["reset"] is True and gone["items"] == [] and gone["seq"] >= kept_from
        assert gone["epoch"] == first["epoch"]
        kept = await poll(api, channel="inventory", after=kept_from - 1, epoch=first["epoch"])
        assert kept["reset"] is False and kept["items"][0]["seq"] == kept_from


@pytest.mark.gen_test(timeout=180)
async def test_a_recreated_database_under_a_subscribed_client_is_a_new_epoch_with_a_fresh_snapshot(own_shop):
    shop = own_shop
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        isbns = {await api.new_book(staff) for _ in range(3)}
        await numbered(api, "books", isbns)
        ws = await connect(session, shop)
        subscribed, snapshot = await subscribe(ws, "books")  # read after their events: no event follows
        old, old_seq = subscribed["epoch"], snapshot["seq"]
        assert old_seq >= 3

        await in_thread(shop.kill, "catalog", signal.SIGTERM)
        client, db = database(shop, "catalog")
        try:
            await client.drop_database(db.name)
        finally:
            client.close()
        await in_thread(shop.start, "catalog")  # its start-up makes the database again, with a new epoch

        frames = await read_until(ws, snapshot_of("books", old), 60)
        fresh = frames[-1]
        assert EPOCH.fullmatch(fresh["epoch"]) and fresh["epoch"] != old
        assert fresh["data"]["items"] == [] and fresh["seq"] < old_seq  # the new history, numbered afresh
        assert not [f for f in frames if f["type"] == "event"]  # nothing of either history in between

        isbn = await api.new_book(staff)
        event = (await read_until(ws, book_created(isbn), 30))[-1]
        assert event["seq"] == fresh["seq"] + 1

        # a client that was away comes back with the old history's position: a snapshot, not an error
        late = await connect(session, shop)
        await late.send_json({"op": "subscribe", "channel": "books", "after": old_seq, "epoch": old})
        frames = await read_until(late, snapshot_of("books"))
        assert [f["type"] for f in frames] == ["subscribed", "snapshot"]
        assert frames[0]["epoch"] == frames[1]["epoch"] == fresh["epoch"]
        assert [b["isbn"] for b in frames[1]["data"]["items"]] == [isbn]
        page = await poll(api, channel="books", after=old_seq - 1, epoch=old)
        assert page["reset"] is True and page["epoch"] == fresh["epoch"]
        await ws.close()
        await late.close()


@pytest.mark.gen_test(timeout=180)
async def test_run_py_new_epoch_gives_every_subscriber_a_fresh_snapshot_in_the_new_epoch(own_shop):
    shop = own_shop
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff = await api.staff()
        await numbered(api, "books", {await api.new_book(staff)})
        ws = await connect(session, shop)
        subscribed, snapshot = await subscribe(ws, "books")  # read after the book's event: no event follows
        old, last = subscribed["epoch"], snapshot["seq"]

        def new_epoch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, RUN_PY, "new-epoch", *args], env=env or shop.env,
                                  capture_output=True, text=True, timeout=60)
        done = await in_thread(new_epoch, "catalog")
        assert done.returncode == 0, done.stderr
        new = re.search(r"new epoch ([A-Za-z0-9_-]+)", done.stdout).group(1)
        assert new != old

        frames = await read_until(ws, snapshot_of("books", old), 60)  # the catalog keeps serving meanwhile
        assert frames[-1]["epoch"] == new and frames[-1]["seq"] == last  # the same numbers, another history
        assert not [f for f in frames if f["type"] == "event"]
        assert (await poll(api, channel="books", after=last, epoch=old))["reset"] is True
        assert (await poll(api, channel="books", after=last, epoch=new))["reset"] is False
        isbn = await api.new_book(staff)
        event = (await read_until(ws, book_created(isbn), 30))[-1]
        assert event["seq"] == last + 1
        await ws.close()

        # the command's own errors
        bad = await in_thread(new_epoch, "payments")
        assert bad.returncode == 2 and "catalog, inventory or orders" in bad.stderr
        no_db = {k: v for k, v in shop.env.items() if k != "MONGODB_URI"}
        missing = await in_thread(lambda: new_epoch("catalog", env=no_db))
        assert missing.returncode == 2 and "MONGODB_URI" in missing.stderr

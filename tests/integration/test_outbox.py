"""The outbox and its relays against the real database: numbering without holes or duplicates, under
concurrent writers and competing relays, and after a relay crashed half-way."""
from __future__ import annotations

import asyncio
import datetime
import itertools
import random
import uuid

import pymongo
import pytest

from bookshop.storage.inventory import LevelRepo
from bookshop.storage.mongo import Database
from bookshop.storage.outbox import EventLog, Relay, new_event, utcnow

WRITERS = 32
TRANSACTIONS = 200
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


class SimulatedCrash(Exception):
    """The relay process died at this point."""


class CrashOnDelete:
    """An outbox collection whose relay dies right after numbering, before removing what it moved."""

    def __init__(self, collection):
        self._collection = collection

    def __getattr__(self, name):
        return getattr(self._collection, name)

    async def delete_many(self, *args, **kwargs):
        raise SimulatedCrash()


class Instances:
    """A fresh database of the test's own. Each ``await open()`` is one more instance of a service on it: its
    own client, and an event log with its indexes. The fixture drops the database and closes the clients."""

    def __init__(self, uri: str):
        self.uri = uri
        self.name = "outbox_" + uuid.uuid4().hex[:10]
        self.opened: list[Database] = []

    async def open(self) -> tuple[Database, EventLog]:
        db = Database(self.uri, self.name)
        self.opened.append(db)
        log = EventLog(db)
        await log.create_indexes()
        return db, log


def instances_on(uri: str):
    made = Instances(uri)
    yield made
    if made.opened:
        with pymongo.MongoClient(uri) as client:
            client.drop_database(made.name)
    for db in made.opened:
        db.close()


@pytest.fixture
def instances(mongodb_uri):
    yield from instances_on(mongodb_uri)


@pytest.fixture
def private_instances(private_mongodb_uri):
    """On a database server of the test's own (see conftest's ``private_mongodb_uri``)."""
    yield from instances_on(private_mongodb_uri)


async def expire_lease(log: EventLog) -> None:
    """As if the lease holder had stalled for longer than its lease."""
    await log.meta.update_one({"_id": "relay"}, {"$set": {"lease_until": EPOCH}})


def assert_contiguous(seqs: list[int], after: int) -> None:
    assert seqs == list(range(after + 1, after + 1 + len(seqs))), f"hole or reorder after {after}: {seqs[:10]}"


@pytest.mark.gen_test(timeout=90)
async def test_concurrent_writers_and_two_relays_number_every_event_once_without_holes(instances):
    db_a, log_a = await instances.open()
    db_b, log_b = await instances.open()  # another instance of the service: its own client
    relays = [Relay(log_a, batch=25, fallback=0.02), Relay(log_b, batch=25, fallback=0.02)]
    stop = asyncio.Event()
    recorded: list[str] = []
    tickets = iter(range(TRANSACTIONS))
    seen: list[int] = []
    reader_errors: list[str] = []

    async def writer():
        for n in tickets:
            event = new_event("book.created", {"n": n, "isbn": f"isbn-{n}"})

            async def work(session, n=n, event=event):
                await db_a["books"].insert_one({"_id": f"isbn-{n}", "n": n}, session=session)
                await log_a.record(event, session=session)
            await db_a.transaction(work)
            recorded.append(str(event["_id"]))
            random.choice(relays).kick()

    async def lease_thief():
        # move the lease again and again, each time once its new holder made progress, and often while a
        # relay is half-way through a pass: both relays move events, and fence each other
        for turn in itertools.count():
            if turn % 3 == 2:
                await expire_lease(log_a)  # up for grabs
                holders = relays
            else:
                holders = [relays[turn % 2]]
                await log_a.meta.update_one({"_id": "relay"}, {"$set": {
                    "owner": holders[0].owner, "lease_until": utcnow() + datetime.timedelta(seconds=5)}},
                    upsert=True)  # the first turn too: the other relay would keep a lease it took first
            # a relay trusts its lease until half of it has passed; a stolen lease is noticed at the next
            # renewal (the seq index fences it meanwhile). Make both notice now, so both get turns.
            for relay in relays:
                relay.forget_lease()
            before = sum(r.moved for r in holders)
            while sum(r.moved for r in holders) == before:
                if stop.is_set():
                    return
                await asyncio.sleep(0.002)
            await asyncio.sleep(random.uniform(0, 0.01))

    async def reader():
        after = 0
        while not stop.is_set() or after < TRANSACTIONS:
            page = await log_b.read(after, 1000)
            seqs = [e["seq"] for e in page]
            if seqs and seqs[0] != after + 1:
                reader_errors.append(f"after {after} the log showed {seqs[:5]}")
            if seqs != list(range(after + 1, after + 1 + len(seqs))):
                reader_errors.append(f"after {after} the log showed {seqs[:20]}")
                return
            seen.extend(seqs)
            after = seqs[-1] if seqs else after
            await asyncio.sleep(0.002)

    running = [asyncio.ensure_future(r.run(stop)) for r in relays]
    thief = asyncio.ensure_future(lease_thief())
    reading = asyncio.ensure_future(reader())
    try:
        await asyncio.gather(*(writer() for _ in range(WRITERS)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while await log_a.events.count_documents({}) < TRANSACTIONS or await log_a.outbox.count_documents({}):
            assert loop.time() < deadline, "the relays did not drain the outbox"
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(reading, 10)
        await asyncio.gather(*running, thief)

        docs = await log_a.events.find({}).sort("seq", 1).to_list(None)
        assert [d["seq"] for d in docs] == list(range(1, TRANSACTIONS + 1))
        assert sorted(d["source"] for d in docs) == sorted(recorded)
        assert sorted(d["data"]["n"] for d in docs) == list(range(TRANSACTIONS))
        assert await log_a.latest_seq() == TRANSACTIONS
        assert await log_a.oldest_seq() == 1
        assert relays[0].moved > 0 and relays[1].moved > 0, "both relays should have held the lease"
        assert relays[0].moved + relays[1].moved == TRANSACTIONS
        assert reader_errors == []
        assert seen == list(range(1, TRANSACTIONS + 1))
        public = await log_a.read(TRANSACTIONS - 2, 10)
        assert [e["seq"] for e in public] == [TRANSACTIONS - 1, TRANSACTIONS]
        assert set(public[0]) == {"seq", "event", "data", "at"} and public[0]["at"].endswith("Z")
    finally:
        stop.set()
        for task in (*running, thief, reading):
            task.cancel()
        await asyncio.gather(*running, thief, reading, return_exceptions=True)


@pytest.mark.gen_test(timeout=30)
async def test_a_rolled_back_change_is_never_announced(instances):
    db, log = await instances.open()

    async def work(session):
        await log.record(new_event("book.created", {"isbn": "nope"}), session=session)
        await db["books"].insert_one({"_id": "nope"}, session=session)
        raise SimulatedCrash()
    with pytest.raises(SimulatedCrash):
        await db.transaction(work)
    assert await Relay(log).run_once() == 0
    assert await log.events.count_documents({}) == 0
    assert await db["books"].count_documents({}) == 0


@pytest.mark.gen_test(timeout=30)
async def test_an_event_numbered_by_a_relay_that_crashed_before_removing_it_is_not_numbered_again(instances):
    db, log = await instances.open()
    levels = LevelRepo(db, leftover_seconds=0)  # numbered events leave their document at the next pass
    await levels.create_indexes()
    first, second = new_event("book.created", {"isbn": "a"}), new_event("book.created", {"isbn": "b"})
    await log.record(first)
    await log.record(second)
    await levels.restock("9780000000002", 3)  # a hot document: the event waits inside it

    async def crashing_levels(limit):
        found = await levels.pending_events(limit)

        async def crash():
            raise SimulatedCrash()
        return [(event, crash if ack is not None else None) for event, ack in found]

    doomed_log = EventLog(db)
    doomed_log.outbox = CrashOnDelete(log.outbox)
    with pytest.raises(SimulatedCrash):
        await Relay(doomed_log, [crashing_levels]).run_once()
    assert await log.events.count_documents({}) == 3  # numbered, but still waiting where they were
    assert await log.outbox.count_documents({}) == 2

    await expire_lease(log)
    doomed_log.outbox = log.outbox
    with pytest.raises(SimulatedCrash):
        await Relay(doomed_log, [crashing_levels]).run_once()  # numbered outbox, died before the ack
    await expire_lease(log)

    await log.record(new_event("book.created", {"isbn": "c"}))
    await levels.restock("9780000000002", 4)
    successor = Relay(log, [levels.pending_events])
    assert await successor.run_once() == 2  # only the two new ones
    assert await successor.run_once() == 0
    events = await log.read(0, 100)
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    assert [e["data"].get("isbn") for e in events] == ["a", "b", "9780000000002", "c", "9780000000002"]
    assert [e["data"].get("on_hand") for e in events[2::2]] == [3, 7]
    assert await log.outbox.count_documents({}) == 0
    assert await db["levels"].count_documents({"pending.at": {"$gte": EPOCH}}) == 0


@pytest.mark.gen_test(timeout=30)
async def test_a_relay_that_lost_its_lease_is_fenced_and_never_overwrites_a_seq(instances):
    db, log = await instances.open()
    old, new = Relay(log), Relay(log)
    await log.record(new_event("book.created", {"isbn": "a"}))
    assert await old.run_once() == 1
    assert await new.run_once() == 0  # the lease is held
    await expire_lease(log)
    await log.record(new_event("book.created", {"isbn": "b"}))
    assert await new.run_once() == 1  # took over at seq 2
    await expire_lease(log)
    await log.record(new_event("book.created", {"isbn": "c"}))
    old._next_seq = 2  # it never noticed it lost the lease in between
    assert await old.run_once() == 0  # seq 2 is taken: fenced
    assert await old.run_once() == 1  # re-read the tail: seq 3
    events = await log.read(0, 10)
    assert [(e["seq"], e["data"]["isbn"]) for e in events] == [(1, "a"), (2, "b"), (3, "c")]


@pytest.mark.gen_test(timeout=30)
async def test_a_waiter_wakes_when_the_relay_numbers_an_event(instances):
    db, log = await instances.open()
    relay = Relay(log)
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = asyncio.ensure_future(log.wait(0, 5.0))
    await asyncio.sleep(0.05)
    await log.record(new_event("book.created", {"isbn": "a"}))
    assert await relay.run_once() == 1
    await asyncio.wait_for(waiting, 2.0)
    assert loop.time() - started < 1.0
    await log.wait(0, 5.0)  # already past: returns at once
    assert loop.time() - started < 1.0


async def server_ops(db: Database) -> dict:
    """The server's operation counters (reads and writes; not commands such as this one)."""
    status = await db.client.admin.command("serverStatus")
    return {k: status["opcounters"].get(k, 0) for k in ("query", "getmore", "insert", "update", "delete")}


async def numbered(log: EventLog, seq: int, deadline: float) -> None:
    """Wait (at most ``deadline`` seconds) until the log has numbered ``seq``."""
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline
    while log.last_seen < seq:
        assert loop.time() < until, f"seq {seq} not numbered within {deadline}s (last {log.last_seen})"
        await log.wait(log.last_seen, 0.5)


@pytest.mark.gen_test(timeout=60)
async def test_an_idle_relay_costs_the_database_nothing_and_every_kind_of_write_wakes_it(private_instances):
    db, log = await private_instances.open()
    levels = LevelRepo(db, log)  # registers its embedded events with the log
    await levels.create_indexes()
    relay = Relay(log, fallback=60.0)  # far longer than any wait below: only a wake-up can number in time
    stop = asyncio.Event()
    running = asyncio.ensure_future(relay.run(stop))
    try:
        await log.record(new_event("book.created", {"isbn": "a"}))
        await numbered(log, 1, 10)
        await asyncio.sleep(0.2)  # the pass that numbered it ends
        before = await server_ops(db)
        await asyncio.sleep(2.0)  # an idle stretch: no poll, no lease renewal, no read at all
        assert await server_ops(db) == before

        await log.record(new_event("book.created", {"isbn": "b"}))  # an outbox insert
        await numbered(log, 2, 10)

        async def work(session):  # an outbox insert inside a transaction: announced once committed
            await db["books"].insert_one({"_id": "c"}, session=session)
            await log.record(new_event("book.created", {"isbn": "c"}), session=session)
        await db.transaction(work)
        await numbered(log, 3, 10)

        await levels.restock("9780000000002", 2)  # an event embedded in a level document
        await numbered(log, 4, 10)
        events = await log.read(0, 10)
        assert [e["data"]["isbn"] for e in events] == ["a", "b", "c", "9780000000002"]
        assert await log.outbox.count_documents({}) == 0
    finally:
        stop.set()
        await running


@pytest.mark.gen_test(timeout=30)
async def test_a_relay_that_stops_releases_its_lease_so_another_numbers_at_once(instances):
    db, log = await instances.open()
    stopping, successor = Relay(log), Relay(log)
    await log.record(new_event("book.created", {"isbn": "a"}))
    assert await stopping.run_once() == 1
    await log.record(new_event("book.created", {"isbn": "b"}))
    assert await successor.run_once() == 0  # the lease is held for a while yet
    await stopping.release()
    assert await successor.run_once() == 1  # no waiting it out
    assert [(e["seq"], e["data"]["isbn"]) for e in await log.read(0, 10)] == [(1, "a"), (2, "b")]
    await stopping.release()  # not ours any more: changes nothing
    await log.record(new_event("book.created", {"isbn": "c"}))
    assert await successor.run_once() == 1


@pytest.mark.gen_test(timeout=60)
async def test_readers_of_another_process_are_woken_by_a_change_stream_only_when_one_is_needed(instances):
    db_a, log_a = await instances.open()
    db_b, log_b = await instances.open()  # another instance: readers here, numbering over there
    numbering, looking = Relay(log_a), Relay(log_b, fallback=1.0)
    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(t)
             for t in (numbering.run(stop), looking.run(stop), log_a.watch(stop), log_b.watch(stop))]
    try:
        reader_a = asyncio.ensure_future(numbered(log_a, 1, 10))
        reader_b = asyncio.ensure_future(numbered(log_b, 1, 10))
        await asyncio.sleep(0.1)  # both readers wait
        assert not log_a.watch_wanted() and not log_b.watch_wanted()  # one process so far: no stream
        await log_a.record(new_event("book.created", {"isbn": "a"}))
        await reader_a
        await reader_b  # the other instance's fallback look saw it ...
        assert not log_a.watch_wanted()  # ... the numbering process never needs a stream
        assert log_b.watch_wanted()  # ... and from now on its readers have one
        looking.fallback = 60.0  # no look-around in time for the next event: only the stream can wake B
        looking.kick()  # (its current wait ends now, the next one lasts the new fallback)
        reader_b = asyncio.ensure_future(numbered(log_b, 2, 10))
        await asyncio.sleep(0.5)  # the stream is open, the reader waits
        await log_a.record(new_event("book.created", {"isbn": "b"}))
        await reader_b
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

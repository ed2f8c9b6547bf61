"""One contract, two implementations: the same cases run against each in-memory fake of ``tests/fakes.py``
(what the use cases' unit tests stand on) and the real repository on the embedded database (or the mongod
``MONGODB_URI`` names). A fake that drifts from its repository fails here, not in production."""
from __future__ import annotations

import contextlib
import datetime
import uuid

import pytest
from fakes import FakeBooks, FakeCharges, FakeCoPurchases, FakeLoginAttempts, FakeUsers

from bookshop.services import recommendations as rec
from bookshop.services.recommendations import StreamState

KINDS = ["fake", "real"]


FAKES = {"books": FakeBooks, "charges": FakeCharges, "users": FakeUsers, "attempts": FakeLoginAttempts,
         "co_purchases": FakeCoPurchases}


def real(what: str, db):
    from bookshop.storage.catalog import BookRepo
    from bookshop.storage.outbox import EventLog
    from bookshop.storage.payments import ChargeRepo
    from bookshop.storage.recommendations import CoPurchaseRepo
    from bookshop.storage.users import LoginAttemptRepo, UserRepo
    return {"books": lambda: BookRepo(db, EventLog(db)), "charges": lambda: ChargeRepo(db),
            "users": lambda: UserRepo(db), "attempts": lambda: LoginAttemptRepo(db),
            "co_purchases": lambda: CoPurchaseRepo(db)}[what]()


@contextlib.asynccontextmanager
async def repository(what: str, kind: str, mongodb_uri: str):
    """The fake, or the real repository on a database of its own (indexes made, dropped with the client)."""
    if kind == "fake":
        yield FAKES[what]()
        return
    from bookshop.storage.mongo import Database
    db = Database(mongodb_uri, "contract_" + uuid.uuid4().hex[:12])
    try:
        repo = real(what, db)
        if hasattr(repo, "create_indexes"):
            await repo.create_indexes()
        yield repo
    finally:
        db.close()


def a_book(isbn="9780000000019", **fields) -> dict:
    return {"isbn": isbn, "title": "Dune", "authors": ["Frank Herbert"], "category": "fiction",
            "price_cents": 999, "currency": "EUR", **fields}


# -- books -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.gen_test(timeout=60)
async def test_a_book_is_added_once_read_back_and_gone_when_deleted(kind, mongodb_uri):
    async with repository("books", kind, mongodb_uri) as repo:
        added = await repo.add(a_book())
        assert added["_id"] == "9780000000019" and added["title"] == "Dune" and added["deleted_at"] is None
        assert added["created_at"] == added["updated_at"]
        assert await repo.add(a_book(title="Again")) is None
        assert (await repo.get("9780000000019"))["title"] == "Dune"
        assert await repo.get("9780000000026") is None
        assert await repo.delete("9780000000019") is True
        assert await repo.get("9780000000019") is None
        assert await repo.delete("9780000000019") is False
        assert (await repo.add(a_book(title="Back"))) is not None  # a deleted ISBN may come back on sale
        assert (await repo.get("9780000000019"))["title"] == "Back"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.gen_test(timeout=60)
async def test_an_update_applies_only_while_the_book_still_has_the_expected_values(kind, mongodb_uri):
    async with repository("books", kind, mongodb_uri) as repo:
        await repo.add(a_book())
        doc = await repo.update("9780000000019", {"price_cents": 1099})
        assert doc["price_cents"] == 1099 and doc["title"] == "Dune"
        assert await repo.update("9780000000019", {"title": "X"}, {"title": "Not Dune"}) is None
        doc = await repo.update("9780000000019", {"title": "Dune Messiah"}, {"title": "Dune"})
        assert doc["title"] == "Dune Messiah" and doc["updated_at"] >= doc["created_at"]
        assert await repo.update("9780000000026", {"title": "X"}) is None
        await repo.delete("9780000000019")
        assert await repo.update("9780000000019", {"title": "X"}) is None


# -- charges ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.gen_test(timeout=60)
async def test_a_charge_is_recorded_once_and_refunded_once(kind, mongodb_uri):
    async with repository("charges", kind, mongodb_uri) as repo:
        doc, created = await repo.record("o1", 1500, "EUR", "4242", "charged", None)
        assert created and doc["status"] == "charged" and [e["kind"] for e in doc["ledger"]] == ["charge"]
        again, created = await repo.record("o1", 999, "EUR", "4242", "declined", "insufficient_funds")
        assert not created and again["amount_cents"] == 1500 and again["status"] == "charged"
        refunded = await repo.refund("o1")
        assert refunded["refunded"] is True and [e["kind"] for e in refunded["ledger"]] == ["charge", "refund"]
        assert await repo.refund("o1") is None
        assert (await repo.get("o1"))["refunded"] is True
        assert await repo.void("o1") is False


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.gen_test(timeout=60)
async def test_a_declined_charge_has_nothing_to_refund_and_a_voided_order_refuses_a_late_charge(kind, mongodb_uri):
    async with repository("charges", kind, mongodb_uri) as repo:
        doc, _ = await repo.record("o2", 1500, "EUR", "0002", "declined", "card_declined")
        assert doc["ledger"] == [] and doc["reason"] == "card_declined"
        assert await repo.refund("o2") is None
        assert await repo.refund("o3") is None and await repo.get("o3") is None
        assert await repo.void("o3") is True
        late, created = await repo.record("o3", 1500, "EUR", "4242", "charged", None)
        assert not created and late["status"] == "voided"


# -- users ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.gen_test(timeout=60)
async def test_an_account_is_found_by_id_and_email_and_a_new_password_moves_its_version(kind, mongodb_uri):
    async with repository("users", kind, mongodb_uri) as repo:
        ann = await repo.add("ann@example.com", "Ann", "hash-1")
        assert ann["role"] == "customer" and ann["password_hash"] == "hash-1" and isinstance(ann["_id"], str)
        assert await repo.add("ann@example.com", "Another Ann", "hash-2") is None
        assert (await repo.by_email("ann@example.com"))["_id"] == ann["_id"]
        assert await repo.by_email("bob@example.com") is None and await repo.by_id("nobody") is None
        await repo.set_hash(ann["_id"], "hash-1b")  # the same password, rehashed: not a change
        doc = await repo.by_id(ann["_id"])
        assert doc["password_hash"] == "hash-1b" and doc.get("token_version", 0) == 0
        await repo.change_password(ann["_id"], "hash-3")
        doc = await repo.by_id(ann["_id"])
        assert doc["password_hash"] == "hash-3" and doc["token_version"] == 1


# -- login attempts --------------------------------------------------------------------------------------------
LOCK, WINDOW = datetime.timedelta(seconds=60), datetime.timedelta(minutes=15)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.gen_test(timeout=60)
async def test_attempts_counted_before_the_check_lock_once_past_the_limit(kind, mongodb_uri):
    async with repository("attempts", kind, mongodb_uri) as repo:
        assert await repo.locked_for("email:a") == 0
        for _ in range(3):
            assert await repo.begin("email:a", 3, LOCK, WINDOW) == 0
        assert await repo.begin("email:a", 3, LOCK, WINDOW) == LOCK.total_seconds()
        await repo.succeed("email:a")
        assert await repo.begin("email:a", 3, LOCK, WINDOW) == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.gen_test(timeout=60)
async def test_failures_lock_a_key_at_the_limit_until_it_succeeds(kind, mongodb_uri):
    async with repository("attempts", kind, mongodb_uri) as repo:
        await repo.fail("ip:1", 2, LOCK, WINDOW)
        assert await repo.locked_for("ip:1") == 0
        await repo.fail("ip:1", 2, LOCK, WINDOW)
        assert 0 < await repo.locked_for("ip:1") <= LOCK.total_seconds()
        assert await repo.begin("ip:1", 2, LOCK, WINDOW) > 0  # locked: begin says how long
        await repo.begin("email:b", 1, LOCK, WINDOW)  # counted by begin, then found wrong
        await repo.fail("email:b", 1, LOCK, WINDOW, counted=True)
        assert await repo.locked_for("email:b") > 0
        await repo.succeed("email:b")
        assert await repo.locked_for("email:b") == 0


# -- co-purchases ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.gen_test(timeout=60)
async def test_one_owner_holds_the_lease_until_it_lets_go(kind, mongodb_uri):
    async with repository("co_purchases", kind, mongodb_uri) as repo:
        assert await repo.take_lease("a", 6) is True
        assert await repo.take_lease("a", 6) is True  # renewed
        assert await repo.take_lease("b", 6) is False
        await repo.release_lease("b")  # not b's to release
        assert await repo.take_lease("b", 6) is False
        await repo.release_lease("a")
        assert await repo.take_lease("b", 6) is True


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.gen_test(timeout=60)
async def test_a_commit_continues_the_state_it_was_made_from_or_changes_nothing(kind, mongodb_uri):
    async with repository("co_purchases", kind, mongodb_uri) as repo:
        start = await repo.state()
        assert start.last_seq == 0 and not start.built
        model = rec.CoPurchases()
        model.learn(rec.OrderChange("u1", "o1", True, ("9780000000019", "9780000000026")))
        after = StreamState(last_seq=1, built=True)
        assert await repo.commit(start, after, model) is False  # never built: nothing to continue
        assert await repo.replace_all("me", rec.CoPurchases(), StreamState(last_seq=0, built=True), False)
        built = await repo.state()
        assert await repo.commit(built, after, model) is True
        assert (await repo.state()).last_seq == 1
        assert await repo.commit(built, StreamState(last_seq=2, built=True), model) is False  # stale
        partners = await repo.partners_of(["9780000000019", "9780000000050"])
        assert set(partners) == {"9780000000019"} and "9780000000026" in partners["9780000000019"]
        assert await repo.held_books("u1") == rec.held_books((await repo.holdings_of(["u1"]))["u1"])
        assert await repo.holdings_of(["nobody"]) == {}

"""The use cases the handlers call, against the in-memory fakes of tests/fakes.py (whose contract with the
real repositories is tests/integration/test_repository_contracts.py)."""
from __future__ import annotations


import pytest
from harness import run
from fakes import FakeBooks, FakeCharges, FakeLoginAttempts, FakeUsers

from bookshop.services import accounts, errors
from bookshop.services.books import EditBook
from bookshop.services.catalog import search_words
from bookshop.services.logins import Login, LockoutPolicy
from bookshop.services.payments import RefundPayment
from bookshop.services.recommendations import Recommend

ISBN = "9780000000019"


async def shelf() -> FakeBooks:
    books = FakeBooks()
    book = {"isbn": ISBN, "title": "Dune", "authors": ["Frank Herbert"], "category": "fiction", "price_cents": 999}
    await books.add({**book, **search_words(book)})
    return books


# -- EditBook ---------------------------------------------------------------------------------------------------
def test_a_new_title_rewrites_the_search_words_from_the_authors_as_they_are():
    async def scenario():
        books = await shelf()
        doc = await EditBook(books)(ISBN, {"title": "Children of Dune"})
        assert doc["title"] == "Children of Dune" and doc["words"] == search_words(doc)["words"]
        assert "children" in doc["words"] and "herbert" in doc["author_words"]
    run(scenario())


def test_an_edit_that_loses_a_race_with_another_reads_again_and_keeps_both():
    async def scenario():
        books = await shelf()
        raced = []

        async def other_editor():  # changes the authors between our read and our write, once
            if not raced:
                raced.append(True)
                books.docs[ISBN]["authors"] = ["F. Herbert", "B. Herbert"]
        books.before_update = other_editor
        doc = await EditBook(books)(ISBN, {"title": "Dune Messiah"})
        assert books.updates == 2
        assert doc["title"] == "Dune Messiah" and doc["authors"] == ["F. Herbert", "B. Herbert"]
        assert doc["author_words"] == search_words(doc)["author_words"]
    run(scenario())


def test_an_edit_that_keeps_losing_is_a_conflict_and_a_missing_book_not_found():
    async def scenario():
        books = await shelf()

        async def always():
            books.docs[ISBN]["title"] += "!"
        books.before_update = always
        with pytest.raises(errors.Conflict):
            await EditBook(books, attempts=3)(ISBN, {"title": "X"})
        assert books.updates == 3
        books.before_update = None
        with pytest.raises(errors.NotFound):
            await EditBook(books)("9780000000026", {"title": "X"})
        with pytest.raises(errors.NotFound):
            await EditBook(books)("9780000000026", {"price_cents": 5})
        assert (await EditBook(books)(ISBN, {"price_cents": 5}))["price_cents"] == 5
    run(scenario())


# -- RefundPayment ----------------------------------------------------------------------------------------------
def test_a_charged_order_is_refunded_once():
    async def scenario():
        charges = FakeCharges()
        await charges.record("o1", 1500, "EUR", "4242", "charged", None)
        refund = RefundPayment(charges)
        doc, refunded = await refund("o1")
        assert refunded and doc["refunded"] and [e["kind"] for e in doc["ledger"]] == ["charge", "refund"]
        doc, refunded = await refund("o1")
        assert not refunded and len(doc["ledger"]) == 2
    run(scenario())


def test_a_declined_order_is_left_as_it_is_and_one_never_charged_is_voided():
    async def scenario():
        charges = FakeCharges()
        await charges.record("o1", 1500, "EUR", "0002", "declined", "card_declined")
        assert (await RefundPayment(charges)("o1")) == (await charges.get("o1"), False)
        doc, refunded = await RefundPayment(charges)("o2")
        assert not refunded and doc["status"] == "voided"
        _, created = await charges.record("o2", 1500, "EUR", "4242", "charged", None)
        assert not created  # a charge arriving after the refund is refused
    run(scenario())


@pytest.mark.parametrize("moment", ["after_refund", "before_void"])
def test_a_charge_landing_while_the_refund_looks_is_refunded(moment):
    async def scenario():
        charges = FakeCharges()

        async def lands():
            await charges.record("o1", 1500, "EUR", "4242", "charged", None)
        setattr(charges, moment, lands)
        doc, refunded = await RefundPayment(charges)("o1")
        assert refunded and doc["status"] == "charged" and doc["refunded"]
    run(scenario())


# -- Login and its lockout --------------------------------------------------------------------------------------
class Counts:
    def __init__(self):
        self.seen: list[str] = []

    def count(self, name: str, amount: float = 1) -> None:
        self.seen.append(name)


class Issuer:
    async def pair(self, user, family=None):
        return {"access_token": f"for {user['_id']}"}


def login_of(user, max_failures=3):
    hashes = accounts.HashPool(workers=1, queue=4)
    metrics = Counts()
    policy = LockoutPolicy(FakeLoginAttempts(), hashes, max_failures, 60, metrics)
    users = FakeUsers()
    users.docs[user["_id"]] = dict(user)
    return Login(users, policy, Issuer()), hashes, metrics


def test_a_login_answers_a_token_pair_and_counts_it():
    user = {"_id": "u1", "email": "ann@example.com", "password_hash": accounts.hash_password("s3cret-pass")}
    login, hashes, metrics = login_of(user)
    try:
        assert run(login(" Ann@Example.com ", "s3cret-pass", "10.0.0.1")) == {"access_token": "for u1"}
        assert metrics.seen == ["logins"] and login.users.docs["u1"]["password_hash"] == user["password_hash"]
    finally:
        hashes.close()


def test_wrong_passwords_lock_the_email_and_then_even_the_right_one_waits():
    user = {"_id": "u1", "email": "ann@example.com", "password_hash": accounts.hash_password("s3cret-pass")}
    login, hashes, metrics = login_of(user, max_failures=2)

    async def scenario():
        for _ in range(2):
            with pytest.raises(errors.Unauthenticated):
                await login("ann@example.com", "wrong-password", "10.0.0.1")
        with pytest.raises(errors.RateLimited) as locked:
            await login("ann@example.com", "s3cret-pass", "10.0.0.2")
        assert locked.value.retry_after == 60
        with pytest.raises(errors.Unauthenticated):  # an unknown email costs a check, and says the same
            await login("nobody@example.com", "s3cret-pass", "10.0.0.3")
    try:
        run(scenario())
        assert metrics.seen == ["logins_failed"] * 3
    finally:
        hashes.close()


# -- Recommend --------------------------------------------------------------------------------------------------
class Recommender:
    async def for_book(self, isbn, customer=None):
        return [{"for": isbn, "customer": customer}]

    async def for_customer(self, customer):
        return [{"customer": customer}]


def test_recommendations_are_for_a_book_or_a_customer_with_the_position_they_were_made_at():
    recommend = Recommend(Recommender(), lambda: 41)
    assert run(recommend(ISBN, "u1")) == ([{"for": ISBN, "customer": "u1"}], 41)
    assert run(recommend(None, "u1")) == ([{"customer": "u1"}], 41)
    with pytest.raises(errors.InvalidInput):
        run(recommend(None, None))


def test_a_login_with_a_hash_of_weaker_parameters_stores_it_anew_and_keeps_the_version():
    import argon2
    weak = argon2.PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash("s3cret-pass")
    user = {"_id": "u1", "email": "ann@example.com", "password_hash": weak}
    login, hashes, _ = login_of(user)
    try:
        run(login("ann@example.com", "s3cret-pass", "10.0.0.1"))
        stored = login.users.docs["u1"]
        assert stored["password_hash"] != weak and not accounts.needs_rehash(stored["password_hash"])
        assert stored.get("token_version", 0) == 0  # the same password: the account's logins stay
    finally:
        hashes.close()


# -- Register ---------------------------------------------------------------------------------------------------
def test_registration_is_limited_per_address_and_an_email_is_taken_once():
    from bookshop.services.logins import Register
    hashes = accounts.HashPool(workers=1, queue=4)
    metrics = Counts()
    users = FakeUsers()
    register = Register(users, hashes, accounts.RegistrationLimit(2, clock=lambda: 0.0), metrics)

    async def scenario():
        ann = await register(" Ann@Example.com ", "s3cret-pass", " Ann ", "10.0.0.1")
        assert ann["email"] == "ann@example.com" and ann["name"] == "Ann"
        assert accounts.verify_password(ann["password_hash"], "s3cret-pass")
        with pytest.raises(errors.Conflict):
            await register("ann@example.com", "s3cret-pass", "Ann", "10.0.0.1")
        with pytest.raises(errors.RateLimited):  # the address's third registration in the window
            await register("bob@example.com", "s3cret-pass", "Bob", "10.0.0.1")
        assert (await register("bob@example.com", "s3cret-pass", "Bob", "10.0.0.2"))["email"] == "bob@example.com"
        with pytest.raises(errors.InvalidInput):
            await register("carol@example.com", "short", "Carol", "10.0.0.3")
    try:
        run(scenario())
        assert metrics.seen == ["users_registered"] * 2 and len(users.docs) == 2
    finally:
        hashes.close()

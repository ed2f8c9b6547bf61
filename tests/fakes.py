"""In-memory fakes of the repositories the use cases are unit-tested against.

Each one keeps the contract of its real repository, and ``tests/integration/test_repository_contracts.py``
runs the same cases against both, so a fake cannot drift from what it stands for."""
from __future__ import annotations

import copy
import dataclasses
import uuid

from bookshop.services import errors
from bookshop.services import recommendations as rec
from bookshop.services.clock import utcnow
from bookshop.services.recommendations import StreamState


class FakeBooks:
    """``storage.catalog.BookRepo``'s reads and writes of single books (no search, no events)."""

    def __init__(self):
        self.docs: dict[str, dict] = {}
        self.updates = 0
        #: called before each update is applied: a test's concurrent editor
        self.before_update = None

    async def add(self, book: dict) -> dict | None:
        current = self.docs.get(book["isbn"])
        if current is not None and current.get("deleted_at") is None:
            return None
        now = utcnow()
        self.docs[book["isbn"]] = {"_id": book["isbn"], **book, "created_at": now, "updated_at": now,
                                   "deleted_at": None}
        return copy.deepcopy(self.docs[book["isbn"]])

    async def get(self, isbn: str) -> dict | None:
        doc = self.docs.get(isbn)
        return copy.deepcopy(doc) if doc is not None and doc.get("deleted_at") is None else None

    async def update(self, isbn: str, changes: dict, expect: dict | None = None) -> dict | None:
        if self.before_update is not None:
            await self.before_update()
        self.updates += 1
        doc = self.docs.get(isbn)
        if doc is None or doc.get("deleted_at") is not None:
            return None
        if any(doc.get(k) != v for k, v in (expect or {}).items()):
            return None
        doc.update(copy.deepcopy(changes), updated_at=utcnow())
        return copy.deepcopy(doc)

    async def delete(self, isbn: str) -> bool:
        doc = self.docs.get(isbn)
        if doc is None or doc.get("deleted_at") is not None:
            return False
        doc["deleted_at"] = utcnow()
        return True


class FakeUsers:
    """``storage.users.UserRepo``: accounts by id and by (normalised) email."""

    def __init__(self):
        self.docs: dict[str, dict] = {}

    async def add(self, email: str, name: str, password_hash: str, role: str = "customer") -> dict | None:
        if any(d["email"] == email for d in self.docs.values()):
            return None
        doc = {"_id": uuid.uuid4().hex[:24], "email": email, "name": name, "role": role,
               "password_hash": password_hash, "created_at": utcnow()}
        self.docs[doc["_id"]] = doc
        return copy.deepcopy(doc)

    async def by_email(self, email: str) -> dict | None:
        return next((copy.deepcopy(d) for d in self.docs.values() if d["email"] == email), None)

    async def by_id(self, user_id: str) -> dict | None:
        return copy.deepcopy(self.docs.get(user_id))

    async def set_hash(self, user_id: str, password_hash: str) -> None:
        if user_id in self.docs:
            self.docs[user_id]["password_hash"] = password_hash

    async def change_password(self, user_id: str, password_hash: str) -> None:
        if user_id in self.docs:
            doc = self.docs[user_id]
            doc["password_hash"] = password_hash
            doc["token_version"] = doc.get("token_version", 0) + 1


class FakeCharges:
    """``storage.payments.ChargeRepo``: one charge document per order, with its ledger."""

    def __init__(self):
        self.docs: dict[str, dict] = {}
        #: called once by the next refund that finds nothing, or the next void: a test's charge landing then
        self.after_refund = None
        self.before_void = None

    async def get(self, order_id: str) -> dict | None:
        return copy.deepcopy(self.docs.get(order_id))

    async def record(self, order_id, amount_cents, currency, last4, status, reason) -> tuple[dict, bool]:
        if order_id in self.docs:
            return copy.deepcopy(self.docs[order_id]), False
        now = utcnow()
        self.docs[order_id] = {"_id": order_id, "amount_cents": amount_cents, "currency": currency, "last4": last4,
                               "status": status, "reason": reason, "refunded": False, "created_at": now,
                               "ledger": [{"kind": "charge", "amount_cents": amount_cents, "at": now}]
                               if status == "charged" else []}
        return copy.deepcopy(self.docs[order_id]), True

    async def refund(self, order_id: str) -> dict | None:
        doc = self.docs.get(order_id)
        if doc is None or doc["status"] != "charged" or doc["refunded"]:
            if self.after_refund is not None:
                hook, self.after_refund = self.after_refund, None
                await hook()
            return None
        doc["refunded"] = True
        doc["ledger"].append({"kind": "refund", "amount_cents": doc["amount_cents"], "at": utcnow()})
        return copy.deepcopy(doc)

    async def void(self, order_id: str) -> bool:
        if self.before_void is not None:
            hook, self.before_void = self.before_void, None
            await hook()
        if order_id in self.docs:
            return False
        self.docs[order_id] = {"_id": order_id, "status": "voided", "refunded": False, "ledger": [],
                               "created_at": utcnow()}
        return True


class FakeLoginAttempts:
    """``storage.users.LoginAttemptRepo``: failures per key, a lock once they reach a limit. (The real one
    forgets a key ``window`` after its last failure, by a TTL index: no contract case waits for that.)"""

    def __init__(self):
        self.docs: dict[str, dict] = {}

    async def locked_for(self, key: str) -> float:
        until = self.docs.get(key, {}).get("locked_until")
        return max(0.0, (until - utcnow()).total_seconds()) if until else 0.0

    async def begin(self, key, limit, lock, window) -> float:
        now = utcnow()
        doc = self.docs.setdefault(key, {"failures": 0})
        if doc.get("locked_until") is not None and doc["locked_until"] <= now:  # a lock that ran out
            doc["failures"] = 0
            del doc["locked_until"]
        doc["failures"] = doc.get("failures", 0) + 1
        if doc.get("locked_until") is not None:
            return (doc["locked_until"] - now).total_seconds()
        return lock.total_seconds() if doc["failures"] > limit else 0.0

    async def fail(self, key, limit, lock, window, counted=False) -> None:
        doc = self.docs.get(key) if counted else self.docs.setdefault(key, {"failures": 0})
        if not counted:
            doc["failures"] = doc.get("failures", 0) + 1
        if doc is not None and doc.get("failures", 0) >= limit:
            doc["locked_until"] = utcnow() + lock
            if not counted:
                doc.pop("failures")

    async def succeed(self, key: str) -> None:
        self.docs.pop(key, None)


class FakeCoPurchases:
    """``storage.recommendations.CoPurchaseRepo``: a commit applies entirely, or not at all when the state
    moved."""

    def __init__(self):
        self.stream = StreamState()
        self.holdings: dict = {}
        self.partners: dict = {}
        self.lease: tuple[str, float] | None = None
        self.commits = 0
        self.fail_next_commit = False
        self.most_customers = None  # a commit of more customers than this raises BatchTooLarge

    async def take_lease(self, owner, seconds):
        if self.lease is None or self.lease[0] == owner:
            self.lease = (owner, seconds)
            return True
        return False

    async def release_lease(self, owner):
        if self.lease and self.lease[0] == owner:
            self.lease = None

    async def state(self, finish=True):
        return dataclasses.replace(self.stream)

    async def holdings_of(self, user_ids):
        return {u: copy.deepcopy(self.holdings[u]) for u in user_ids if u in self.holdings}

    async def partners_of(self, isbns):
        return {i: copy.deepcopy(self.partners[i]) for i in isbns if i in self.partners}

    async def held_books(self, user_id):
        return rec.held_books(self.holdings.get(user_id, {}))

    async def commit(self, before, after, model):
        if self.fail_next_commit:
            self.fail_next_commit = False
            raise errors.Unavailable("database down")
        if self.most_customers is not None and len(model.dirty_customers) > self.most_customers:
            raise rec.BatchTooLarge(f"{len(model.dirty_customers)} customers")
        if not self.stream.built or self.stream.last_seq != before.last_seq:
            return False
        for c in model.dirty_customers:
            if model.holdings.get(c):
                self.holdings[c] = copy.deepcopy(model.holdings[c])
            else:
                self.holdings.pop(c, None)
        for b in model.dirty_books:
            if model.partners.get(b):
                self.partners[b] = copy.deepcopy(model.partners[b])
            else:
                self.partners.pop(b, None)
        self.stream = dataclasses.replace(self.stream, last_seq=after.last_seq, last_event=after.last_event)
        self.commits += 1
        return True

    async def replace_all(self, owner, model, state, keep_lease):
        self.holdings = copy.deepcopy(model.holdings)
        self.partners = copy.deepcopy(model.partners)
        self.stream = dataclasses.replace(state)
        return True

    def counts(self, isbn):
        return {k: c - e for k, (c, e) in self.partners.get(isbn, {}).items()}

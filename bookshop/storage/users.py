"""The users service's collections: accounts, refresh tokens, signing keys, login attempts."""
from __future__ import annotations

import datetime

import pymongo
from bson import ObjectId

from bookshop.services.errors import Unavailable
from bookshop.storage.mongo import DuplicateKeyError
from bookshop.storage.outbox import utcnow


class UserRepo:
    """Accounts. ``token_version`` counts the changes of role or password: a refresh token records the
    version it was issued under and is refused once the account has moved on."""

    def __init__(self, db):
        self.users = db["users"]

    async def create_indexes(self) -> None:
        await self.users.create_index("email", unique=True)

    async def add(self, email: str, name: str, password_hash: str, role: str = "customer") -> dict | None:
        """The new user, or None when the (normalised) email is taken."""
        doc = {"_id": str(ObjectId()), "email": email, "name": name, "role": role,
               "password_hash": password_hash, "created_at": utcnow()}
        try:
            await self.users.insert_one(doc)
        except DuplicateKeyError:
            return None
        return doc

    async def by_email(self, email: str) -> dict | None:
        return await self.users.find_one({"email": email})

    async def by_id(self, user_id: str) -> dict | None:
        return await self.users.find_one({"_id": user_id})

    async def set_hash(self, user_id: str, password_hash: str) -> None:
        """The same password hashed anew (stronger parameters): not a change of password."""
        await self.users.update_one({"_id": user_id}, {"$set": {"password_hash": password_hash}})

    async def change_password(self, user_id: str, password_hash: str) -> None:
        await self.users.update_one({"_id": user_id}, {"$set": {"password_hash": password_hash},
                                                       "$inc": {"token_version": 1}})

    async def ensure_staff(self, email: str, name: str, password_hash: str) -> str:
        """Make ``email`` a staff account with this password (a change of role and password); its id."""
        await self.users.update_one(
            {"email": email},
            {"$set": {"role": "staff", "password_hash": password_hash}, "$inc": {"token_version": 1},
             "$setOnInsert": {"_id": str(ObjectId()), "name": name, "created_at": utcnow()}},
            upsert=True)
        return (await self.users.find_one({"email": email}, {"_id": 1}))["_id"]


class RefreshTokenRepo:
    """Refresh tokens, stored hashed. Each belongs to a family (one login); reusing a used one revokes it."""

    def __init__(self, db):
        self.tokens = db["refresh_tokens"]

    async def create_indexes(self) -> None:
        await self.tokens.create_index("family")
        await self.tokens.create_index("user_id")
        await self.tokens.create_index("expires_at", expireAfterSeconds=0)

    async def add(self, token_hash: str, user_id: str, family: str, expires_at: datetime.datetime,
                  user_version: int = 0) -> None:
        await self.tokens.insert_one({"_id": token_hash, "user_id": user_id, "family": family,
                                      "user_version": user_version, "expires_at": expires_at, "used_at": None,
                                      "revoked": False})

    async def use(self, token_hash: str, now: datetime.datetime) -> tuple[str, dict | None]:
        """Mark a token used, once (of concurrent calls exactly one gets "ok"). Returns ("ok", doc), ("used",
        doc) with the first use's ``used_at`` when it was used before, or ("unknown", None) for a token
        that is unknown, revoked or expired and unused."""
        doc = await self.tokens.find_one_and_update(
            {"_id": token_hash, "used_at": None, "revoked": False, "expires_at": {"$gt": now}},
            {"$set": {"used_at": now}})
        if doc is not None:
            return "ok", doc
        doc = await self.tokens.find_one({"_id": token_hash})
        if doc is not None and doc.get("used_at") is not None:
            return "used", doc
        return "unknown", None

    async def revoke_family(self, family: str) -> None:
        """Revoke every token of a login. The family's marker is written first, so a refresh racing with
        this either finds its token revoked, or has stored its new token before the update below (which
        then revokes it too), or sees the marker afterwards (``family_revoked``)."""
        await self.tokens.update_one({"_id": f"family:{family}"},
                                     {"$set": {"family": family, "revoked": True,
                                               "expires_at": utcnow() + datetime.timedelta(days=1)}},
                                     upsert=True)
        await self.tokens.update_many({"family": family}, {"$set": {"revoked": True}})

    async def family_revoked(self, family: str) -> bool:
        return await self.tokens.find_one({"_id": f"family:{family}"}, {"_id": 1}) is not None

    async def revoke_login(self, token_hash: str) -> None:
        """Revoke the family (the login) of a token, whatever its state; nothing if it is unknown."""
        doc = await self.tokens.find_one({"_id": token_hash}, {"family": 1})
        if doc is not None:
            await self.revoke_family(doc["family"])

    async def revoke_user(self, user_id: str) -> None:
        await self.tokens.update_many({"user_id": user_id, "revoked": False}, {"$set": {"revoked": True}})


class KeyRepo:
    """Signing keys. Exactly one is active; retired ones stay published until their tokens expire."""

    def __init__(self, db):
        self.keys = db["signing_keys"]

    async def active(self) -> dict | None:
        return await self.keys.find_one({"active": True}, sort=[("created_at", -1)])

    async def add_first(self, key: dict) -> None:
        """Store the first key; a concurrent first start of another instance wins harmlessly."""
        try:
            await self.keys.insert_one({"_id": "first", **key, "active": True, "created_at": utcnow(),
                                        "retire_at": None})
        except DuplicateKeyError:
            pass

    async def rotate(self, key: dict, keep_old_for: datetime.timedelta) -> None:
        now = utcnow()
        # the new key first: there is never a moment without an active key (logins would get 503)
        await self.keys.insert_one({"_id": key["kid"], **key, "active": True, "created_at": now,
                                    "retire_at": None})
        await self.keys.update_many({"active": True, "_id": {"$ne": key["kid"]}},
                                    {"$set": {"active": False, "retire_at": now + keep_old_for}})

    async def published(self) -> list[dict]:
        now = utcnow()
        cursor = self.keys.find({"$or": [{"active": True}, {"retire_at": {"$gt": now}}]},
                                {"public_jwk": 1}).sort("created_at", pymongo.DESCENDING)
        return [d["public_jwk"] for d in await cursor.to_list(20)]


class LoginAttemptRepo:
    """Failed-login counters per email and per client address, kept in the database so every users
    instance (and a restarted one) sees the same numbers."""

    def __init__(self, db):
        self.attempts = db["login_attempts"]

    async def create_indexes(self) -> None:
        await self.attempts.create_index("expires_at", expireAfterSeconds=0)

    async def locked_for(self, key: str) -> float:
        """Seconds until ``key`` may try again (0 when it may)."""
        doc = await self.attempts.find_one({"_id": key}, {"locked_until": 1})
        if doc and doc.get("locked_until"):
            left = (doc["locked_until"] - utcnow()).total_seconds()
            return max(0.0, left)
        return 0.0

    async def begin(self, key: str, limit: int, lock: datetime.timedelta, window: datetime.timedelta) -> float:
        """Count an attempt as a failure *before* its password is checked (``succeed`` forgets the count), so
        concurrent guesses cannot slip in under the limit. Seconds to wait; 0 when it may go ahead.

        The lock and the count are read from the one atomic increment, and a lock keeps its count until it
        runs out, so no attempt can see "unlocked" after the lock was set."""
        now = utcnow()
        # a lock that has run out starts a new count
        await self.attempts.update_one({"_id": key, "locked_until": {"$lte": now}},
                                       {"$set": {"failures": 0}, "$unset": {"locked_until": ""}})
        doc = await self._count(key, now + window)
        locked_until = doc.get("locked_until")
        if locked_until is not None and locked_until > now:
            return (locked_until - now).total_seconds()
        return lock.total_seconds() if doc["failures"] > limit else 0.0

    async def _count(self, key: str, expires_at: datetime.datetime) -> dict:
        for _ in range(3):
            try:
                doc = await self.attempts.find_one_and_update(
                    {"_id": key}, {"$inc": {"failures": 1}, "$max": {"expires_at": expires_at}},
                    upsert=True, return_document=pymongo.ReturnDocument.AFTER)
            except DuplicateKeyError:  # MongoDB: two first attempts raced to create the counter; count again
                continue
            if doc is None:  # the embedded server answers some racing upserts with no document, yet applies them
                doc = await self.attempts.find_one({"_id": key})
            if doc is not None:
                return doc
        raise Unavailable("login attempts could not be counted; retry", retry_after=1)

    async def fail(self, key: str, limit: int, lock: datetime.timedelta, window: datetime.timedelta,
                   counted: bool = False) -> None:
        """Record a failure (``counted``: already counted by ``begin``); lock ``key`` once it reaches ``limit``."""
        now = utcnow()
        doc = (await self.attempts.find_one({"_id": key}) if counted else await self._count(key, now + window))
        if doc is not None and doc.get("failures", 0) >= limit:
            update: dict = {"$set": {"locked_until": now + lock}, "$max": {"expires_at": now + lock + window}}
            if not counted:
                update["$unset"] = {"failures": ""}
            await self.attempts.update_one({"_id": key}, update)

    async def succeed(self, key: str) -> None:
        await self.attempts.delete_one({"_id": key})

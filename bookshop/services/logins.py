"""Use cases of accounts: registering, the password check with its lockout, logging in, changing the
password, refreshing a login.

Plain Python over the users service's repositories (``storage/users.py``) and the Argon2id pool
(``accounts.HashPool``); the handlers only parse the request, call these and write the answer."""
from __future__ import annotations

import datetime
import logging
import math
from typing import Callable, Protocol

from bookshop.services import accounts, errors

log = logging.getLogger(__name__)

#: failures are counted within this window; a lock lasts ``BOOKSHOP_LOGIN_LOCK_SECONDS``
FAILURE_WINDOW = datetime.timedelta(minutes=15)
#: an address may fail this many times the per-email limit before it is locked out
ADDRESS_FACTOR = 10


class Attempts(Protocol):
    async def locked_for(self, key: str) -> float: ...

    async def begin(self, key: str, limit: int, lock: datetime.timedelta, window: datetime.timedelta) -> float: ...

    async def fail(self, key: str, limit: int, lock: datetime.timedelta, window: datetime.timedelta,
                   counted: bool = False) -> None: ...

    async def succeed(self, key: str) -> None: ...


class Counter(Protocol):
    def count(self, name: str, amount: float = 1) -> None: ...


class LockoutPolicy:
    """The one check of a password (a login, a password change), counted per email and per client address:
    ``RateLimited`` while either is locked, ``Unauthenticated`` when the password is wrong."""

    def __init__(self, attempts: Attempts, hashes: accounts.HashPool, max_failures: int, lock_seconds: float,
                 metrics: Counter):
        self.attempts = attempts
        self.hashes = hashes
        self.max_failures = max_failures
        self.lock = datetime.timedelta(seconds=lock_seconds)
        self.metrics = metrics

    async def check(self, email: str, address: str, stored_hash: str | None, password: str) -> None:
        """``password`` against ``stored_hash`` (None: no such account, which costs the same). Call it inside
        ``hashes.admit(...)``."""
        attempts, limit, lock = self.attempts, self.max_failures, self.lock
        email_key, ip_key = f"email:{email}", f"ip:{address}"
        wait = await attempts.locked_for(ip_key)
        if wait <= 0:
            # counted before the (slow) password check: a burst of parallel guesses gets no more than the limit
            wait = await attempts.begin(email_key, limit, lock, FAILURE_WINDOW)
        if wait > 0:
            raise errors.RateLimited("too many failed logins; try again later", code="too_many_attempts",
                                     retry_after=math.ceil(wait))
        if not await self.hashes.run(accounts.verify_password, stored_hash, password):
            await attempts.fail(email_key, limit, lock, FAILURE_WINDOW, counted=True)
            await attempts.fail(ip_key, limit * ADDRESS_FACTOR, lock, FAILURE_WINDOW)
            self.metrics.count("logins_failed")
            raise errors.Unauthenticated("wrong email or password", code="invalid_credentials")
        await attempts.succeed(email_key)


class Login:
    """Log in with email and password: a token pair, the password rehashed if its parameters are old."""

    def __init__(self, users, policy: LockoutPolicy, issuer: accounts.TokenIssuer):
        self.users = users
        self.policy = policy
        self.issuer = issuer

    async def __call__(self, email: str, password: str, address: str) -> dict:
        email = email.strip().lower()[:254]
        hashes = self.policy.hashes
        with hashes.admit("login"):
            user = await self.users.by_email(email)
            await self.policy.check(email, address, user["password_hash"] if user else None, password)
            if accounts.needs_rehash(user["password_hash"]):
                rehashed = await hashes.run(accounts.hash_password, password)
                await self.users.set_hash(user["_id"], rehashed)  # the same password: its logins stay
        self.policy.metrics.count("logins")
        return await self.issuer.pair(user)


def invalid_refresh() -> errors.Unauthenticated:
    return errors.Unauthenticated("refresh token unknown, used or expired", code="invalid_refresh_token")


class Refresh:
    """Rotate a refresh token. Of concurrent refreshes with one token one wins; a used token presented again
    is refused, and ends the whole login when it comes back after the grace (someone kept a copy)."""

    def __init__(self, tokens, users, issuer: accounts.TokenIssuer, now: Callable[[], datetime.datetime]):
        self.tokens = tokens
        self.users = users
        self.issuer = issuer
        self._now = now

    async def __call__(self, refresh_token: str) -> dict:
        tokens, now = self.tokens, self._now()
        state, doc = await tokens.use(accounts.hash_refresh_token(refresh_token), now)
        if state == "used":
            if accounts.refresh_reuse_is_theft(doc["used_at"], now):
                await tokens.revoke_family(doc["family"])
                log.warning("refresh token reuse for user %s; family revoked", doc["user_id"])
            raise invalid_refresh()
        if state != "ok":
            raise invalid_refresh()
        user = await self.users.by_id(doc["user_id"])
        if user is None or user.get("token_version", 0) != doc.get("user_version", 0):
            raise invalid_refresh()  # the account's role or password changed since this login
        pair = await self.issuer.pair(user, doc["family"])
        if await tokens.family_revoked(doc["family"]):  # signed out (or found stolen) while we were at it
            await tokens.revoke_family(doc["family"])
            raise invalid_refresh()
        return pair


class Register:
    """Open an account: at most ``limit`` per client address per ten minutes (``accounts.RegistrationLimit``,
    counted in this process); the password hashed in the bounded pool."""

    def __init__(self, users, hashes: accounts.HashPool, limit: accounts.RegistrationLimit, metrics: Counter):
        self.users = users
        self.hashes = hashes
        self.limit = limit
        self.metrics = metrics

    async def __call__(self, email: str, password: str, name: str, address: str) -> dict:
        email = accounts.normalize_email(email)
        accounts.check_password_rules(password)
        name = accounts.check_name(name)
        with self.hashes.admit("registration"):  # first: a 503 is not counted against the address
            wait = self.limit.hit(address)
            if wait > 0:
                raise errors.RateLimited("too many registrations from this address; try again later",
                                         code="too_many_attempts", retry_after=math.ceil(wait))
            password_hash = await self.hashes.run(accounts.hash_password, password)
        user = await self.users.add(email, name, password_hash)
        if user is None:
            raise errors.Conflict("an account with this email exists", code="email_taken")
        self.metrics.count("users_registered")
        log.info("registered user %s", user["_id"])
        return user


class ChangePassword:
    """A new password for a signed-in account: a wrong current one counts like a failed login; a change signs
    every login of the account out (its refresh tokens are revoked, and those issued before are refused)."""

    def __init__(self, users, refresh_tokens, policy: LockoutPolicy):
        self.users = users
        self.refresh_tokens = refresh_tokens
        self.policy = policy

    async def __call__(self, user_id: str, current: str, new: str, address: str) -> None:
        accounts.check_password_rules(new, field="new_password")
        user = await self.users.by_id(user_id)
        if user is None:
            raise errors.NotFound("user not found")
        hashes = self.policy.hashes
        with hashes.admit("login"):
            await self.policy.check(user["email"], address, user["password_hash"], current)
            new_hash = await hashes.run(accounts.hash_password, new)
        await self.users.change_password(user["_id"], new_hash)
        await self.refresh_tokens.revoke_user(user["_id"])
        self.policy.metrics.count("password_changes")
        log.info("password changed for user %s; its refresh tokens are revoked", user["_id"])

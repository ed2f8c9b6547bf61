"""Accounts and tokens: email rules, Argon2id password hashing (and its bound), the registration limit,
refresh token rules, RS256 signing keys and JWTs."""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import datetime
import functools
import hashlib
import re
import secrets
import time
import uuid
from typing import Callable, Iterator

import argon2
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bookshop.services.errors import InvalidInput, Unavailable
from bookshop.services.tokens import ALGORITHM, AUDIENCE, ISSUER

# OWASP's minimum for Argon2id: m=19 MiB, t=2, p=1 (we run at exactly that; raise it here and every
# account is rehashed on its next login).
HASHER = argon2.PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16,
                               type=argon2.Type.ID)
REFRESH_TTL = datetime.timedelta(days=30)
#: a used refresh token presented again this soon after its first use is the client's own retry (an answer
#: lost on the way, two tabs refreshing at once): refused, and nothing else. Later, someone else kept a copy.
REFRESH_REUSE_GRACE = datetime.timedelta(seconds=10)
#: the contract's window of the registration limit per client address
REGISTRATION_WINDOW = 600
#: Argon2id runs at once (each holds a core and 19 MiB for ~50 ms), and how many more may wait for one
HASH_WORKERS = 2
HASH_QUEUE = 32
SERVICE_TOKEN_TTL = 3600
_EMAIL = re.compile(r"^[^@\s\x00-\x1f]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$")


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    """A real hash to verify against when the email is unknown, so that costs the same as a wrong password."""
    return HASHER.hash(secrets.token_urlsafe(16))


def normalize_email(email: str) -> str:
    email = email.strip()
    if len(email) > 254 or not _EMAIL.match(email):
        raise InvalidInput("email: not a valid email address", code="invalid_field", details={"field": "email"})
    return email.lower()


def check_password_rules(password: str, field: str = "password") -> None:
    if len(password) < 8:
        raise InvalidInput(f"{field}: must be at least 8 characters", code="invalid_field",
                           details={"field": field})
    if len(password) > 1024:
        raise InvalidInput(f"{field}: must be at most 1024 characters", code="invalid_field",
                           details={"field": field})


def check_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 200:
        raise InvalidInput("name: must be 1 to 200 characters", code="invalid_field", details={"field": "name"})
    return name


def hash_password(password: str) -> str:
    return HASHER.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """Constant-cost check; ``stored_hash`` None (unknown email) still pays for one verification."""
    try:
        return HASHER.verify(stored_hash or _dummy_hash(), password) and stored_hash is not None
    except (argon2.exceptions.VerifyMismatchError, argon2.exceptions.InvalidHashError,
            argon2.exceptions.VerificationError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    return HASHER.check_needs_rehash(stored_hash)


def new_refresh_token() -> tuple[str, str]:
    """A refresh token and the hash we store instead of it."""
    token = secrets.token_urlsafe(32)
    return token, hash_refresh_token(token)


def hash_refresh_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def refresh_reuse_is_theft(first_used_at: datetime.datetime, now: datetime.datetime) -> bool:
    """Whether a used refresh token presented again at ``now`` means someone else holds a copy (revoke the
    login), rather than its client retrying (refuse, nothing more)."""
    return now - first_used_at > REFRESH_REUSE_GRACE


class RegistrationLimit:
    """At most ``limit`` registrations per client address per ten minutes, counted in this process (each
    users instance counts its own; a restart starts afresh). A window opens at an address's first
    registration. ``limit`` 0: no limit. At most ``max_addresses`` are remembered: when full, expired windows
    are swept, and failing that the oldest is forgotten, so a flood from many addresses cannot grow memory."""

    def __init__(self, limit: int, seconds: float = REGISTRATION_WINDOW, clock: Callable[[], float] = time.monotonic,
                 max_addresses: int = 100_000):
        self.limit = limit
        self.seconds = seconds
        self._clock = clock
        self._max = max_addresses
        self._windows: dict[str, list] = {}  # address -> [opened_at, count], oldest first

    def __len__(self) -> int:
        return len(self._windows)

    def hit(self, address: str) -> float:
        """Count a registration from ``address``: 0 when it may go ahead, else the seconds until it may."""
        if self.limit <= 0:
            return 0.0
        now = self._clock()
        window = self._windows.get(address)
        if window is not None and now - window[0] >= self.seconds:
            del self._windows[address]
            window = None
        if window is None:
            if len(self._windows) >= self._max:
                self._make_room(now)
            self._windows[address] = [now, 1]
            return 0.0
        if window[1] >= self.limit:
            return window[0] + self.seconds - now
        window[1] += 1
        return 0.0

    def _make_room(self, now: float) -> None:
        for address in [a for a, (opened, _) in self._windows.items() if now - opened >= self.seconds]:
            del self._windows[address]
        while len(self._windows) >= self._max:
            del self._windows[next(iter(self._windows))]


class HashPool:
    """Runs Argon2id off the event loop, ``workers`` at a time, with at most ``queue`` more waiting; anything
    beyond is refused at once with ``Unavailable`` (503 + Retry-After) instead of queueing without bound. A
    flood of registrations may take only half of the places, so logins still get through it."""

    KINDS = ("login", "registration")

    def __init__(self, workers: int = HASH_WORKERS, queue: int = HASH_QUEUE):
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="argon2")
        self._running = asyncio.Semaphore(workers)
        self._places = workers + queue
        self._limits = {"login": self._places, "registration": max(1, self._places // 2)}
        self._admitted = {kind: 0 for kind in self.KINDS}

    @contextlib.contextmanager
    def admit(self, kind: str) -> Iterator[None]:
        """A place for the hashes of one request (a login, a password change: ``login``; ``registration``)."""
        if sum(self._admitted.values()) >= self._places or self._admitted[kind] >= self._limits[kind]:
            raise Unavailable("too many password checks at once; retry shortly", retry_after=1)
        self._admitted[kind] += 1
        try:
            yield
        finally:
            self._admitted[kind] -= 1

    async def run(self, fn: Callable, *args):
        async with self._running:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def new_signing_key() -> dict:
    """A fresh RSA key pair as stored by the users service (the private half never leaves it)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    numbers = key.public_key().public_numbers()

    def b64(n: int) -> str:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    kid = uuid.uuid4().hex[:16]
    return {"kid": kid, "private_pem": pem,
            "public_jwk": {"kty": "RSA", "kid": kid, "use": "sig", "alg": ALGORITHM,
                           "n": b64(numbers.n), "e": b64(numbers.e)}}


class TokenSigner:
    """Signs access tokens with the active key (its PEM loaded once)."""

    def __init__(self, kid: str, private_pem: str):
        self.kid = kid
        self._key = serialization.load_pem_private_key(private_pem.encode(), password=None)

    def sign(self, sub: str, role: str, ttl: int, now: float | None = None) -> str:
        now = int(now if now is not None else time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "role": role, "iat": now, "exp": now + ttl,
                  "jti": uuid.uuid4().hex}
        return jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": self.kid})


class TokenIssuer:
    """Issues access + refresh token pairs with the active signing key (re-read every few seconds, so a
    rotation reaches every instance)."""

    def __init__(self, keys, refresh_tokens, access_ttl: int, now: Callable[[], datetime.datetime]):
        self.keys = keys
        self.refresh_tokens = refresh_tokens
        self.access_ttl = access_ttl
        self._now = now
        self._signer: TokenSigner | None = None
        self._checked = 0.0

    async def signer(self) -> TokenSigner:
        loop = asyncio.get_running_loop()
        if self._signer is None or loop.time() - self._checked > 5:
            key = await self.keys.active()
            if key is None:
                raise Unavailable("no signing key yet", retry_after=1)
            if self._signer is None or self._signer.kid != key["kid"]:
                self._signer = TokenSigner(key["kid"], key["private_pem"])
            self._checked = loop.time()
        return self._signer

    async def pair(self, user: dict, family: str | None = None) -> dict:
        """Tokens for ``user`` as read (its role, its credentials version: a refresh token made from a
        read that predates a change of role or password is refused when it is used)."""
        ttl = self.access_ttl
        access = (await self.signer()).sign(user["_id"], user["role"], ttl)
        refresh, refresh_hash = new_refresh_token()
        await self.refresh_tokens.add(refresh_hash, user["_id"], family or uuid.uuid4().hex,
                                      self._now() + REFRESH_TTL, user.get("token_version", 0))
        return {"access_token": access, "token_type": "Bearer", "expires_in": ttl, "refresh_token": refresh}

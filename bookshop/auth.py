"""Token verification, shared by every service.

The users service signs RS256 JWTs and publishes its public keys at ``/.well-known/jwks.json``. Every other
service verifies tokens here: keys fetched from that JWKS with aiohttp, cached, refetched when a token names
an unknown ``kid`` or while none could be fetched (at most once every few seconds), algorithm pinned to
RS256, ``exp``/``iss``/``aud`` required. Service-to-service calls carry a ``service`` token obtained by OAuth2
client credentials.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Awaitable, Callable

import jwt

from bookshop.services.errors import Unauthenticated, Unavailable
from bookshop.services.tokens import ALGORITHM, AUDIENCE, ISSUER, ROLES

log = logging.getLogger(__name__)

__all__ = ["ALGORITHM", "AUDIENCE", "ISSUER", "ROLES", "Principal", "TokenVerifier", "bearer"]


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is calling: the token's subject and role."""
    sub: str
    role: str
    exp: int

    @property
    def is_staff(self) -> bool:
        return self.role == "staff"

    @property
    def is_service(self) -> bool:
        return self.role == "service"


KeyLoader = Callable[[], Awaitable[dict]]


class TokenVerifier:
    """Verifies bearer tokens against a cached JWKS (``{"keys": [...]}``) from ``load_jwks``."""

    refetch_interval = 3.0
    #: cached keys are refetched this often, so a key that left the JWKS (retired after a rotation, perhaps
    #: because it leaked) stops verifying everywhere, not only in processes started since
    max_age = 300.0

    #: verified tokens remembered (until they expire, or the key set changes): most of a verification's
    #: ~230 µs is PyJWT's parsing, and one token is presented again and again (the service tokens above all)
    cache_size = 10_000

    def __init__(self, load_jwks: KeyLoader):
        self._load_jwks = load_jwks
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # when the last fetch was tried (None: never)
        self._failed_retry_after: int | None = None  # the last fetch failed: the Retry-After to answer with
        self._lock = asyncio.Lock()
        self._verified: dict[str, Principal] = {}

    def forget(self) -> None:
        self._keys = {}
        self._fetched_at = None
        self._failed_retry_after = None
        self._verified.clear()

    async def _refresh(self, force: bool) -> None:
        async with self._lock:
            now = time.monotonic()
            if self._fetched_at is not None:
                # fresh enough: a burst of unknown kids, or of requests while no key could be had (the users
                # service down at our start), costs one fetch per interval, not one per request
                fresh = self.refetch_interval if force or not self._keys else self.max_age
                if now - self._fetched_at < fresh:
                    if self._failed_retry_after is not None and not self._keys:
                        raise Unavailable("token keys unavailable", retry_after=self._failed_retry_after)
                    return
            self._fetched_at = now
            try:
                jwks = await self._load_jwks()
            except Unavailable as exc:
                log.warning("token keys unavailable")
                self._failed_retry_after = exc.retry_after or 2
                raise
            self._failed_retry_after = None
            keys = {}
            for item in jwks.get("keys", []):
                if item.get("kty") == "RSA" and item.get("kid"):
                    try:
                        keys[item["kid"]] = jwt.PyJWK(item, algorithm=ALGORITHM)
                    except jwt.PyJWTError:
                        log.warning("ignoring an unusable key in the JWKS")
            if set(keys) != set(self._keys):
                self._verified.clear()  # a key left (or came): verify everything afresh
            self._keys = keys

    async def key_for(self, kid: str) -> jwt.PyJWK:
        if kid not in self._keys:
            await self._refresh(force=bool(self._keys))
        elif self._fetched_at is None or time.monotonic() - self._fetched_at >= self.max_age:
            try:
                await self._refresh(force=False)
            except Unavailable:
                pass  # the users service is down: keep verifying with the keys we have
        if kid not in self._keys:
            raise Unauthenticated("token signed with an unknown key", code="invalid_token")
        return self._keys[kid]

    async def verify(self, token: str) -> Principal:
        known = self._verified.get(token)
        if known is not None:
            if known.exp > time.time() and self._fetched_at is not None \
                    and time.monotonic() - self._fetched_at < self.max_age:
                return known
            del self._verified[token]
        principal = await self._verify(token)
        if len(self._verified) >= self.cache_size:
            self._verified.clear()
        self._verified[token] = principal
        return principal

    async def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed token", code="invalid_token") from None
        if header.get("alg") != ALGORITHM or not isinstance(header.get("kid"), str):
            raise Unauthenticated("token must be RS256 with a kid", code="invalid_token")
        key = await self.key_for(header["kid"])
        try:
            claims = jwt.decode(token, key.key, algorithms=[ALGORITHM], audience=AUDIENCE, issuer=ISSUER,
                                options={"require": ["exp", "iss", "aud", "sub"]}, leeway=0)
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired", code="token_expired") from None
        except jwt.PyJWTError:
            raise Unauthenticated("invalid token", code="invalid_token") from None
        role = claims.get("role")
        if role not in ROLES or not isinstance(claims["sub"], str):
            raise Unauthenticated("invalid token", code="invalid_token")
        return Principal(sub=claims["sub"], role=role, exp=int(claims["exp"]))


def bearer(header_value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, or None."""
    if not header_value:
        return None
    scheme, _, token = header_value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("Authorization must be 'Bearer <token>'", code="invalid_token")
    return token.strip()

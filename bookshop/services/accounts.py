"""Accounts and tokens: email rules, Argon2id password hashing, RS256 signing keys and JWTs."""
from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import re
import secrets
import time
import uuid

import argon2
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bookshop.auth import ALGORITHM, AUDIENCE, ISSUER
from bookshop.services.errors import InvalidInput

# OWASP's minimum for Argon2id: m=19 MiB, t=2, p=1 (we run at exactly that; raise it here and every
# account is rehashed on its next login).
HASHER = argon2.PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16,
                               type=argon2.Type.ID)
REFRESH_TTL = datetime.timedelta(days=30)
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


def check_password_rules(password: str) -> None:
    if len(password) < 8:
        raise InvalidInput("password: must be at least 8 characters", code="invalid_field",
                           details={"field": "password"})
    if len(password) > 1024:
        raise InvalidInput("password: must be at most 1024 characters", code="invalid_field",
                           details={"field": "password"})


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

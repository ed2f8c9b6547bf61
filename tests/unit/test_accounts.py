"""Account rules: email normalisation, password rules, Argon2id hashing, refresh tokens and signing keys."""
from __future__ import annotations

import time

import argon2
import jwt
import pytest

from bookshop import auth
from bookshop.services import accounts
from bookshop.services.errors import InvalidInput


@pytest.mark.parametrize("raw, normalised", [
    ("Ann@Example.COM", "ann@example.com"),
    ("  ann.reader+books@mail.example.org ", "ann.reader+books@mail.example.org"),
    ("o'neil@sub-domain.example.co.uk", "o'neil@sub-domain.example.co.uk"),
])
def test_emails_are_trimmed_and_lowercased(raw, normalised):
    assert accounts.normalize_email(raw) == normalised


@pytest.mark.parametrize("raw", ["", "ann", "ann@", "@example.com", "ann@example", "ann@@example.com",
                                 "an n@example.com", "ann@exa mple.com", "ann@-example.com", "ann@example-.com",
                                 "ann@example..com", "a\x00nn@example.com", "x" * 65 + "@example.com",
                                 "ann@" + "e" * 250 + ".com"])
def test_malformed_emails_are_refused(raw):
    with pytest.raises(InvalidInput) as info:
        accounts.normalize_email(raw)
    assert info.value.details == {"field": "email"}


def test_password_rules():
    accounts.check_password_rules("12345678")
    for bad in ("", "1234567", "x" * 1025):
        with pytest.raises(InvalidInput) as info:
            accounts.check_password_rules(bad)
        assert info.value.details == {"field": "password"}


def test_names_are_trimmed_and_bounded():
    assert accounts.check_name("  Ann  ") == "Ann"
    for bad in ("", "   ", "x" * 201):
        with pytest.raises(InvalidInput):
            accounts.check_name(bad)


def test_passwords_are_stored_as_salted_argon2id():
    first, second = accounts.hash_password("correct-horse"), accounts.hash_password("correct-horse")
    assert first.startswith("$argon2id$") and first != second  # salted
    assert "correct-horse" not in first
    params = argon2.extract_parameters(first)
    assert params.memory_cost >= 19 * 1024 and params.time_cost >= 2
    assert accounts.verify_password(first, "correct-horse")
    assert not accounts.verify_password(first, "wrong-horse")
    assert not accounts.verify_password("not-a-hash", "correct-horse")
    assert not accounts.needs_rehash(first)
    weak = argon2.PasswordHasher(time_cost=1, memory_cost=8 * 1024).hash("correct-horse")
    assert accounts.needs_rehash(weak) and accounts.verify_password(weak, "correct-horse")


def test_an_unknown_email_still_pays_for_one_hash_check(monkeypatch):
    calls = []
    real = accounts.HASHER

    class Counting:
        def hash(self, password):
            return real.hash(password)

        def verify(self, stored, password):
            calls.append(stored)
            return real.verify(stored, password)
    monkeypatch.setattr(accounts, "HASHER", Counting())
    assert accounts.verify_password(None, "whatever-password") is False
    assert len(calls) == 1 and calls[0].startswith("$argon2id$")
    # even the password the dummy hash was made from does not log anyone in
    assert accounts.verify_password(None, "") is False


def test_refresh_tokens_are_random_and_stored_hashed():
    token, stored = accounts.new_refresh_token()
    other, _ = accounts.new_refresh_token()
    assert token != other and len(token) >= 40
    assert stored == accounts.hash_refresh_token(token) and token not in stored


def test_signing_keys_publish_only_their_public_half():
    key = accounts.new_signing_key()
    assert "PRIVATE KEY" in key["private_pem"]
    assert key["public_jwk"]["kid"] == key["kid"]
    assert set(key["public_jwk"]) == {"kty", "kid", "use", "alg", "n", "e"}
    assert jwt.PyJWK(key["public_jwk"]).key.key_size == 2048


def test_the_signer_writes_the_contract_claims():
    key = accounts.new_signing_key()
    token = accounts.TokenSigner(key["kid"], key["private_pem"]).sign("u7", "customer", 900)
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": key["kid"], "typ": "JWT"}
    claims = jwt.decode(token, jwt.PyJWK(key["public_jwk"]).key, algorithms=["RS256"], audience=auth.AUDIENCE,
                        issuer=auth.ISSUER)
    assert claims["sub"] == "u7" and claims["role"] == "customer"
    assert claims["exp"] - claims["iat"] == 900 and abs(claims["iat"] - time.time()) < 5
    assert claims["jti"]

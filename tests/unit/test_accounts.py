"""Account rules: email normalisation, password rules, Argon2id hashing, refresh tokens and signing keys."""
from __future__ import annotations

import asyncio
import datetime
import threading
import time

import argon2
import jwt
import pytest
from harness import run

from bookshop import auth
from bookshop.services import accounts
from bookshop.services.errors import InvalidInput, Unavailable


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


def test_password_rules_name_the_field_they_check():
    with pytest.raises(InvalidInput) as info:
        accounts.check_password_rules("short", field="new_password")
    assert info.value.details == {"field": "new_password"}
    assert info.value.message.startswith("new_password:")


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


# -- refresh reuse ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seconds_later, theft", [
    (0, False), (0.5, False), (9.999, False), (10, False),  # the client's own retry (a lost answer, two tabs)
    (10.001, True), (60, True), (86400 * 29, True),  # someone else kept a copy
])
def test_a_used_refresh_token_is_theft_only_after_the_grace(seconds_later, theft):
    first_use = datetime.datetime(2030, 1, 1, 12, 0, tzinfo=datetime.timezone.utc)
    now = first_use + datetime.timedelta(seconds=seconds_later)
    assert accounts.REFRESH_REUSE_GRACE == datetime.timedelta(seconds=10)
    assert accounts.refresh_reuse_is_theft(first_use, now) is theft


# -- registrations per client address ---------------------------------------------------------------------
class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_registrations_are_counted_per_address_in_windows_of_ten_minutes():
    clock = Clock()
    window = accounts.RegistrationLimit(3, clock=clock)
    assert window.seconds == 600
    assert [window.hit("198.51.100.1") for _ in range(3)] == [0, 0, 0]
    clock.now += 100
    assert window.hit("198.51.100.1") == pytest.approx(500)  # the window began at the first registration
    assert window.hit("198.51.100.1") == pytest.approx(500)  # refusals do not extend it
    assert window.hit("198.51.100.2") == 0  # another address has its own count
    clock.now += 500
    assert window.hit("198.51.100.1") == 0
    assert window.hit("198.51.100.1") == 0


def test_a_registration_limit_of_zero_is_off():
    window = accounts.RegistrationLimit(0, clock=Clock())
    assert all(window.hit("198.51.100.1") == 0 for _ in range(1000))


def test_the_registration_counters_stay_bounded_under_many_addresses():
    clock = Clock()
    window = accounts.RegistrationLimit(2, clock=clock, max_addresses=100)
    for i in range(1000):
        window.hit(f"2001:db8::{i:x}")
        clock.now += 0.01
        assert len(window) <= 100
    # the newest addresses are still counted
    window.hit("2001:db8::3e7")
    assert window.hit("2001:db8::3e7") > 0
    clock.now += 601  # everything expired: the next hit sweeps
    window.hit("198.51.100.1")
    assert len(window) == 1


# -- the bound on password hashes ------------------------------------------------------------------------
def test_password_hashes_run_a_few_at_a_time_and_the_excess_is_refused_at_once():
    pool = accounts.HashPool(workers=2, queue=4)
    release = threading.Event()
    running = []
    most = [0]
    lock = threading.Lock()

    def slow(i):
        with lock:
            running.append(i)
            most[0] = max(most[0], len(running))
        release.wait(10)
        with lock:
            running.remove(i)
        return i

    async def job(i, kind):
        with pool.admit(kind):
            return await pool.run(slow, i)

    async def scenario():
        jobs = [asyncio.ensure_future(job(i, "login")) for i in range(6)]  # 2 running + 4 waiting
        deadline = time.monotonic() + 10
        while len(running) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for kind in ("login", "registration"):
            with pytest.raises(Unavailable) as info:
                with pool.admit(kind):
                    pass
            assert info.value.retry_after >= 1
        release.set()
        assert await asyncio.gather(*jobs) == list(range(6))
        assert most[0] == 2
        # every slot was given back
        assert await job(7, "registration") == 7
        pool.close()
    run(scenario())


def test_registrations_leave_room_in_the_queue_for_logins():
    pool = accounts.HashPool(workers=1, queue=5)  # 6 places, at most 3 of them registrations
    release = threading.Event()

    async def job(kind):
        with pool.admit(kind):
            return await pool.run(release.wait, 10)

    async def scenario():
        registrations = [asyncio.ensure_future(job("registration")) for _ in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(Unavailable):
            with pool.admit("registration"):
                pass
        logins = [asyncio.ensure_future(job("login")) for _ in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(Unavailable):
            with pool.admit("login"):
                pass
        release.set()
        assert all(await asyncio.gather(*registrations, *logins))
        pool.close()
    run(scenario())

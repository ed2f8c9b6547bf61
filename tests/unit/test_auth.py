"""TokenVerifier against a local JWKS: the tokens it accepts and every forgery it must refuse."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from harness import run
from cryptography.hazmat.primitives import serialization

from bookshop import auth
from bookshop.services import accounts
from bookshop.services.errors import Unauthenticated, Unavailable


@pytest.fixture(scope="module")
def key():
    return accounts.new_signing_key()


@pytest.fixture(scope="module")
def foreign_key():
    return accounts.new_signing_key()


class Loader:
    """A JWKS source that counts how often the verifier asks for it."""

    def __init__(self, *keys):
        self.keys = list(keys)
        self.calls = 0

    async def __call__(self):
        self.calls += 1
        return {"keys": [k["public_jwk"] for k in self.keys]}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: dict) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def claims(**overrides) -> dict:
    now = int(time.time())
    base = {"iss": auth.ISSUER, "aud": auth.AUDIENCE, "sub": "u1", "role": "customer", "iat": now,
            "exp": now + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def signed(key: dict, body: dict, kid: str | None = None) -> str:
    return jwt.encode(body, key["private_pem"], algorithm="RS256", headers={"kid": kid or key["kid"]})


def verify(token: str, *keys) -> auth.Principal:
    async def go():
        return await auth.TokenVerifier(Loader(*keys)).verify(token)
    return run(go())


def refused(token: str, key: dict, code: str = "invalid_token") -> None:
    with pytest.raises(Unauthenticated) as info:
        verify(token, key)
    assert info.value.code == code


def test_a_token_from_the_users_signer_verifies(key):
    token = accounts.TokenSigner(key["kid"], key["private_pem"]).sign("u42", "staff", 900)
    principal = verify(token, key)
    assert principal.sub == "u42" and principal.role == "staff" and principal.is_staff
    assert not principal.is_service
    assert principal.exp > time.time() + 800


def test_service_role_is_accepted(key):
    principal = verify(signed(key, claims(sub="service:orders", role="service")), key)
    assert principal.is_service


def test_alg_none_is_refused(key):
    header = {"alg": "none", "typ": "JWT", "kid": key["kid"]}
    body = claims(role="staff")
    refused(f"{segment(header)}.{segment(body)}.", key)
    # and with the header claiming RS256 but no signature at all
    header = {"alg": "RS256", "typ": "JWT", "kid": key["kid"]}
    refused(f"{segment(header)}.{segment(body)}.", key)


def test_hs256_signed_with_the_public_key_is_refused(key):
    """The classic key-confusion attack: HMAC keyed with the published public key."""
    pem = jwt.PyJWK(key["public_jwk"], algorithm="RS256").key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "typ": "JWT", "kid": key["kid"]}
    signing_input = f"{segment(header)}.{segment(claims(role='staff'))}"
    signature = b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())
    refused(f"{signing_input}.{signature}", key)
    # the same with the header lying that it is RS256
    header = {"alg": "RS256", "typ": "JWT", "kid": key["kid"]}
    signing_input = f"{segment(header)}.{segment(claims(role='staff'))}"
    signature = b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())
    refused(f"{signing_input}.{signature}", key)


def test_edited_claims_with_the_original_signature_are_refused(key):
    token = signed(key, claims(role="customer"))
    header, _, signature = token.split(".")
    forged = f"{header}.{segment(claims(role='staff'))}.{signature}"
    refused(forged, key)
    forged = f"{header}.{segment(claims(sub='someone-else'))}.{signature}"
    refused(forged, key)


def test_a_foreign_key_using_a_real_kid_is_refused(key, foreign_key):
    refused(signed(foreign_key, claims(role="staff"), kid=key["kid"]), key)


def test_an_embedded_jwk_header_is_not_trusted(key, foreign_key):
    token = jwt.encode(claims(role="staff"), foreign_key["private_pem"], algorithm="RS256",
                       headers={"kid": key["kid"], "jwk": foreign_key["public_jwk"]})
    refused(token, key)


def test_expired_token_says_so(key):
    past = int(time.time()) - 100
    refused(signed(key, claims(iat=past - 900, exp=past)), key, code="token_expired")
    token = accounts.TokenSigner(key["kid"], key["private_pem"]).sign("u1", "customer", 10, now=time.time() - 11)
    refused(token, key, code="token_expired")


@pytest.mark.parametrize("change", [
    {"aud": "another-api"},
    {"aud": None},
    {"iss": "evil-issuer"},
    {"iss": None},
    {"exp": None},
    {"sub": None},
    {"exp": "never"},
    {"nbf": int(time.time()) + 3600},
])
def test_wrong_or_missing_registered_claims_are_refused(key, change):
    refused(signed(key, claims(**change)), key)


@pytest.mark.parametrize("role", ["admin", "", "Staff", None])
def test_roles_outside_customer_staff_service_are_refused(key, role):
    body = claims(role=role)
    refused(signed(key, body), key)


def test_a_list_as_role_is_refused(key):
    refused(signed(key, claims(role=["staff"])), key)


@pytest.mark.parametrize("token", [
    "", "garbage", "a.b.c", "a.b", "....", "eyJhbGciOiJSUzI1NiJ9.e30.", "Bearer x",
    segment({"alg": "RS256"}) + "." + segment(claims()) + ".c2ln",  # no kid
    segment({"alg": "RS256", "kid": 7}) + "." + segment(claims()) + ".c2ln",  # kid not a string
])
def test_garbage_is_refused(key, token):
    refused(token, key)


def test_a_token_for_an_unknown_key_is_refused(key, foreign_key):
    refused(signed(foreign_key, claims()), key)


def test_unknown_kids_refetch_the_jwks_at_most_once_per_interval(key, foreign_key, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    loader = Loader(key)
    verifier = auth.TokenVerifier(loader)
    good = signed(key, claims())
    stranger = signed(foreign_key, claims())

    async def flood(n):
        results = await asyncio.gather(*(verifier.verify(stranger) for _ in range(n)), return_exceptions=True)
        assert all(isinstance(r, Unauthenticated) and r.code == "invalid_token" for r in results)

    async def scenario():
        await verifier.verify(good)
        assert loader.calls == 1
        await verifier.verify(good)  # cached
        assert loader.calls == 1
        clock[0] += verifier.refetch_interval + 0.1
        await flood(50)
        assert loader.calls == 2  # one refetch for the whole burst
        await flood(50)
        clock[0] += verifier.refetch_interval / 2
        await flood(50)
        assert loader.calls == 2
        # a rotation: the new key is published, and reaches the verifier once the interval has passed
        loader.keys.append(foreign_key)
        clock[0] += verifier.refetch_interval
        assert (await verifier.verify(stranger)).sub == "u1"
        assert loader.calls == 3
        assert (await verifier.verify(good)).sub == "u1"
        assert loader.calls == 3
    run(scenario())


def test_a_key_that_leaves_the_jwks_stops_verifying_once_the_cache_is_old(key, foreign_key, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    loader = Loader(key, foreign_key)
    verifier = auth.TokenVerifier(loader)
    retired = signed(foreign_key, claims())

    async def scenario():
        assert (await verifier.verify(retired)).sub == "u1"
        loader.keys.remove(foreign_key)  # retired (or revoked after a leak)
        clock[0] += verifier.max_age / 2
        assert (await verifier.verify(retired)).sub == "u1"  # cached for a while: no fetch per request
        assert loader.calls == 1
        clock[0] += verifier.max_age / 2
        with pytest.raises(Unauthenticated):
            await verifier.verify(retired)
        assert loader.calls == 2
        assert (await verifier.verify(signed(key, claims()))).sub == "u1"
        assert loader.calls == 2
    run(scenario())


def test_old_keys_keep_verifying_while_the_jwks_cannot_be_fetched(key, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    loader = Loader(key)
    verifier = auth.TokenVerifier(loader)

    async def down():
        loader.calls += 1
        raise Unavailable("users down")

    async def scenario():
        token = signed(key, claims())
        await verifier.verify(token)
        verifier._load_jwks = down
        clock[0] += verifier.max_age + 1
        assert (await verifier.verify(token)).sub == "u1"
        assert (await verifier.verify(token)).sub == "u1"
        assert loader.calls == 2  # one failed attempt, not one per request
    run(scenario())


def test_keys_unavailable_is_unavailable_not_a_pass(key):
    async def down():
        raise Unavailable("users down")

    async def scenario():
        verifier = auth.TokenVerifier(down)
        with pytest.raises(Unavailable):
            await verifier.verify(signed(key, claims()))
    run(scenario())


def test_with_no_keys_yet_a_burst_while_the_users_service_is_down_fetches_once_per_interval(key, monkeypatch):
    """A service that started while the users service was down must not send it one JWKS fetch per request."""
    clock = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    calls = []

    async def down():
        calls.append(clock[0])
        raise Unavailable("users down", retry_after=2)

    async def scenario():
        verifier = auth.TokenVerifier(down)
        token = signed(key, claims())
        for _ in range(3):
            results = await asyncio.gather(*(verifier.verify(token) for _ in range(50)), return_exceptions=True)
            # still "unavailable" (503), not "unknown key" (401), while no key could be fetched
            assert all(isinstance(r, Unavailable) for r in results), results[:3]
            clock[0] += verifier.refetch_interval / 3
        assert len(calls) == 1
        clock[0] += verifier.refetch_interval
        with pytest.raises(Unavailable):
            await verifier.verify(token)
        assert len(calls) == 2
    run(scenario())


def test_an_empty_key_set_is_refetched_at_most_once_per_interval(key, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    loader = Loader()  # the users service answers, but has published nothing yet

    async def scenario():
        verifier = auth.TokenVerifier(loader)
        token = signed(key, claims())
        results = await asyncio.gather(*(verifier.verify(token) for _ in range(50)), return_exceptions=True)
        assert all(isinstance(r, Unauthenticated) for r in results)
        assert loader.calls == 1
        loader.keys.append(key)
        clock[0] += verifier.refetch_interval + 0.1
        assert (await verifier.verify(token)).sub == "u1"
        assert loader.calls == 2
    run(scenario())


# tenacity 9 deprecates wait_exponential_jitter(initial=...), which bookshop/clients/base.py still passes
@pytest.mark.filterwarnings("ignore:The 'initial' parameter is deprecated:DeprecationWarning")
def test_a_service_keeps_one_users_client_so_its_breaker_opens(key, monkeypatch):
    """Every JWKS load goes through the same client: once the users service has failed often enough its
    circuit opens and further loads fail at once, without a connection attempt."""
    from bookshop.app import ServiceContext
    from bookshop.clients import base
    from bookshop.settings import Settings
    clock = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: clock[0])
    sent = []

    async def unreachable(self, method, url, *args):
        sent.append(url)
        raise base._Transient("users unreachable", retry=False)
    monkeypatch.setattr(base.UpstreamClient, "_send", unreachable)

    async def scenario():
        ctx = ServiceContext("catalog", Settings(service_secret="s"), with_db=False)
        try:
            ctx.use_remote_keys()
            token = signed(key, claims())
            for _ in range(20):
                with pytest.raises(Unavailable):
                    await ctx.verifier.verify(token)
                clock[0] += ctx.verifier.refetch_interval + 0.1
        finally:
            await ctx.close()
        assert sent and all(url.endswith("/.well-known/jwks.json") for url in sent)
        assert len(sent) <= 5, f"{len(sent)} fetches: the circuit breaker never opened"
    run(scenario())


def test_unusable_keys_in_the_jwks_are_ignored(key):
    async def loader():
        return {"keys": [{"kty": "oct", "kid": "sym", "k": b64(b"s" * 32)},
                         {"kty": "RSA", "kid": "broken", "n": "AQAB"},
                         key["public_jwk"]]}

    async def scenario():
        verifier = auth.TokenVerifier(loader)
        assert (await verifier.verify(signed(key, claims()))).sub == "u1"
        with pytest.raises(Unauthenticated):
            await verifier.verify(jwt.encode(claims(), b"s" * 32, algorithm="HS256", headers={"kid": "sym"}))
    run(scenario())


@pytest.mark.parametrize("header, token", [
    (None, None),
    ("", None),
    ("Bearer abc.def.ghi", "abc.def.ghi"),
    ("bearer abc", "abc"),
    ("BEARER   abc  ", "abc"),
])
def test_bearer_header_parsing(header, token):
    assert auth.bearer(header) == token


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Bearer    ", "Token abc", "abc"])
def test_bearer_header_refuses_other_schemes(header):
    with pytest.raises(Unauthenticated) as info:
        auth.bearer(header)
    assert info.value.code == "invalid_token"

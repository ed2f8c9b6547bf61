"""Users service routes: accounts, tokens, the JWKS, service credentials."""
from __future__ import annotations

import asyncio
import datetime
import hmac
import logging
import math
import uuid

from bookshop import SERVICES
from bookshop.handlers.base import BaseHandler
from bookshop.services import accounts, errors
from bookshop.services.accounts import SERVICE_TOKEN_TTL
from bookshop.storage.outbox import utcnow
from bookshop.validation import StrictModel

log = logging.getLogger(__name__)


class NewUser(StrictModel):
    email: str
    password: str
    name: str


class Credentials(StrictModel):
    email: str
    password: str


class RefreshRequest(StrictModel):
    refresh_token: str


def user_view(user: dict) -> dict:
    return {"id": user["_id"], "email": user["email"], "name": user["name"], "role": user["role"]}


async def in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class UsersHandler(BaseHandler):
    public = {"POST"}

    async def post(self):
        body = self.json_body(NewUser)
        email = accounts.normalize_email(body.email)
        accounts.check_password_rules(body.password)
        name = accounts.check_name(body.name)
        password_hash = await in_thread(accounts.hash_password, body.password)
        user = await self.ctx.deps["users"].add(email, name, password_hash)
        if user is None:
            raise errors.Conflict("an account with this email exists", code="email_taken")
        self.ctx.metrics.count("users_registered")
        log.info("registered user %s", user["_id"])
        self.write_json(user_view(user), 201)


class MeHandler(BaseHandler):
    async def get(self):
        principal = self.require("customer", "staff")
        user = await self.ctx.deps["users"].by_id(principal.sub)
        if user is None:
            raise errors.NotFound("user not found")
        self.write_json(user_view(user))


class TokenIssuer:
    """Issues access + refresh token pairs with the active signing key."""

    def __init__(self, ctx):
        self.ctx = ctx
        self._signer: accounts.TokenSigner | None = None
        self._checked = 0.0

    async def signer(self) -> accounts.TokenSigner:
        loop = asyncio.get_running_loop()
        # re-read the active key every few seconds so a rotation reaches every instance
        if self._signer is None or loop.time() - self._checked > 5:
            key = await self.ctx.deps["keys"].active()
            if key is None:
                raise errors.Unavailable("no signing key yet", retry_after=1)
            if self._signer is None or self._signer.kid != key["kid"]:
                self._signer = accounts.TokenSigner(key["kid"], key["private_pem"])
            self._checked = loop.time()
        return self._signer

    async def pair(self, user: dict, family: str | None = None) -> dict:
        ttl = self.ctx.settings.access_token_ttl
        access = (await self.signer()).sign(user["_id"], user["role"], ttl)
        refresh, refresh_hash = accounts.new_refresh_token()
        await self.ctx.deps["refresh_tokens"].add(refresh_hash, user["_id"], family or uuid.uuid4().hex,
                                                  utcnow() + accounts.REFRESH_TTL)
        return {"access_token": access, "token_type": "Bearer", "expires_in": ttl, "refresh_token": refresh}


class TokensHandler(BaseHandler):
    """``POST /api/v1/tokens``: log in. Failures are counted per email and per client address."""

    public = {"POST"}

    def client_address(self) -> str:
        # X-Forwarded-For is believed only when the gateway set it (it proves itself with a service token)
        if self.principal is not None and self.principal.is_service:
            forwarded = self.request.headers.get("X-Forwarded-For", "")
            if forwarded:
                return forwarded.split(",")[-1].strip()[:64]
        return self.request.remote_ip or "unknown"

    async def authenticate(self) -> None:
        service = self.request.headers.get("X-Service-Authorization")
        if service:
            from bookshop import auth
            try:
                self.principal = await self.ctx.verifier.verify(auth.bearer(service) or "")
            except errors.Unauthenticated:
                self.principal = None
        # the route itself is public: credentials are in the body

    async def post(self):
        body = self.json_body(Credentials)
        settings = self.ctx.settings
        attempts = self.ctx.deps["login_attempts"]
        email = body.email.strip().lower()[:254]
        email_key, ip_key = f"email:{email}", f"ip:{self.client_address()}"
        lock = datetime.timedelta(seconds=settings.login_lock_seconds)
        window = datetime.timedelta(minutes=15)
        wait = await attempts.locked_for(ip_key)
        if wait <= 0:
            # counted before the (slow) password check: a burst of parallel guesses gets no more than the limit
            wait = await attempts.begin(email_key, settings.login_max_failures, lock, window)
        if wait > 0:
            raise errors.RateLimited("too many failed logins; try again later", code="too_many_attempts",
                                     retry_after=math.ceil(wait))
        user = await self.ctx.deps["users"].by_email(email)
        stored = user["password_hash"] if user else None
        ok = await in_thread(accounts.verify_password, stored, body.password)
        if not ok:
            await attempts.fail(email_key, settings.login_max_failures, lock, window, counted=True)
            await attempts.fail(ip_key, settings.login_max_failures * 10, lock, window)
            self.ctx.metrics.count("logins_failed")
            raise errors.Unauthenticated("wrong email or password", code="invalid_credentials")
        await attempts.succeed(email_key)
        if accounts.needs_rehash(user["password_hash"]):
            rehashed = await in_thread(accounts.hash_password, body.password)
            await self.ctx.deps["users"].set_hash(user["_id"], rehashed)
        self.ctx.metrics.count("logins")
        self.write_json(await self.ctx.deps["issuer"].pair(user))


class RefreshHandler(BaseHandler):
    public = {"POST"}

    async def post(self):
        body = self.json_body(RefreshRequest)
        tokens = self.ctx.deps["refresh_tokens"]
        state, doc = await tokens.use(accounts.hash_refresh_token(body.refresh_token))
        if state == "reused":
            # a used token came back: someone holds a copy. End the whole login.
            await tokens.revoke_family(doc["family"])
            log.warning("refresh token reuse for user %s; family revoked", doc["user_id"])
        if state != "ok":
            raise errors.Unauthenticated("refresh token unknown, used or expired", code="invalid_refresh_token")
        user = await self.ctx.deps["users"].by_id(doc["user_id"])
        if user is None:
            raise errors.Unauthenticated("refresh token unknown, used or expired", code="invalid_refresh_token")
        self.write_json(await self.ctx.deps["issuer"].pair(user, doc["family"]))


class JwksHandler(BaseHandler):
    public = {"GET"}

    async def get(self):
        self.set_header("Cache-Control", "public, max-age=60")
        self.write_json({"keys": await self.ctx.deps["keys"].published()})


class ServiceTokenHandler(BaseHandler):
    """``POST /oauth/token`` (form or JSON): OAuth2 client credentials → a ``service`` token."""

    public = {"POST"}

    async def post(self):
        if self.request.headers.get("Content-Type", "").startswith("application/json"):
            data = self.json_body()
            form = {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}
        else:
            from urllib.parse import parse_qsl
            form = dict(parse_qsl(self.body.decode("utf-8", "replace")))
        if form.get("grant_type") != "client_credentials":
            raise errors.InvalidInput("grant_type must be client_credentials", code="unsupported_grant_type")
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        expected = self.ctx.settings.service_secret
        if client_id not in SERVICES or not expected or not hmac.compare_digest(secret.encode(), expected.encode()):
            raise errors.Unauthenticated("invalid client credentials", code="invalid_client")
        signer = await self.ctx.deps["issuer"].signer()
        token = signer.sign(f"service:{client_id}", "service", SERVICE_TOKEN_TTL)
        self.write_json({"access_token": token, "token_type": "Bearer", "expires_in": SERVICE_TOKEN_TTL})


def routes() -> list[tuple]:
    return [
        (r"/api/v1/users", UsersHandler),
        (r"/api/v1/users/me", MeHandler),
        (r"/api/v1/tokens", TokensHandler),
        (r"/api/v1/tokens/refresh", RefreshHandler),
        (r"/\.well-known/jwks\.json", JwksHandler),
        (r"/oauth/token", ServiceTokenHandler),
    ]

"""Users service routes: accounts, tokens, the JWKS, service credentials."""
from __future__ import annotations

import hmac
import logging

from bookshop import SERVICES, auth, net
from bookshop.deps import UsersDeps
from bookshop.handlers.base import BaseHandler
from bookshop.services import accounts, errors
from bookshop.services.accounts import SERVICE_TOKEN_TTL
from bookshop.validation import StrictModel

log = logging.getLogger(__name__)


class UsersBase(BaseHandler):
    """Base of the users routes: their collaborators are ``self.deps``."""
    deps: UsersDeps


class NewUser(StrictModel):
    email: str
    password: str
    name: str


class Credentials(StrictModel):
    email: str
    password: str


class RefreshRequest(StrictModel):
    refresh_token: str


class PasswordChange(StrictModel):
    current_password: str
    new_password: str


def user_view(user: dict) -> dict:
    return {"id": user["_id"], "email": user["email"], "name": user["name"], "role": user["role"]}


class AccountHandler(UsersBase):
    """Base of the account routes: the client address they count attempts by (``deps.lockout``)."""

    #: the call came through the gateway, which proves itself with a service token in
    #: ``X-Service-Authorization`` (the caller's own token, if any, stays in ``Authorization``)
    relayed = False

    async def authenticate(self) -> None:
        await super().authenticate()
        relay = self.request.headers.get("X-Service-Authorization")
        if relay:
            try:
                self.relayed = (await self.ctx.verifier.verify(auth.bearer(relay) or "")).is_service
            except errors.Unauthenticated:
                self.relayed = False

    def client_address(self) -> str:
        forwarded = self.request.headers.get("X-Forwarded-For", "")
        if self.relayed and forwarded.strip():
            # the gateway's own computation (behind BOOKSHOP_TRUSTED_PROXIES): believed from it alone
            return forwarded.split(",")[-1].strip()[:net.MAX_ADDRESS]
        return net.client_address(self.request.remote_ip, forwarded, self.ctx.settings.trusted_proxies)


class UsersHandler(AccountHandler):
    """``POST /api/v1/users``: register, at most ``BOOKSHOP_REGISTRATION_LIMIT`` per client address per 10
    minutes (counted in this process)."""

    public = {"POST"}

    async def post(self):
        body = self.json_body(NewUser)
        user = await self.deps.register(body.email, body.password, body.name, self.client_address())
        self.write_json(user_view(user), 201)


class MeHandler(UsersBase):
    async def get(self):
        principal = self.require("customer", "staff")
        user = await self.deps.users.by_id(principal.sub)
        if user is None:
            raise errors.NotFound("user not found")
        self.write_json(user_view(user))


class PasswordHandler(AccountHandler):
    """``POST /api/v1/users/me/password``: a wrong current password counts like a failed login; a change
    signs every login of the account out."""

    async def post(self):
        principal = self.require("customer", "staff")
        body = self.json_body(PasswordChange)
        await self.deps.change_password(principal.sub, body.current_password, body.new_password,
                                        self.client_address())
        self.set_status(204)
        self.finish()


class TokensHandler(AccountHandler):
    """``POST /api/v1/tokens``: log in. Failures are counted per email and per client address."""

    public = {"POST"}

    async def post(self):
        body = self.json_body(Credentials)
        self.write_json(await self.deps.login(body.email, body.password, self.client_address()))


class RefreshHandler(UsersBase):
    """``POST /api/v1/tokens/refresh``: rotation. Of concurrent refreshes with one token one wins; a used
    token presented again is refused, and ends the whole login when it comes back after the grace."""

    public = {"POST"}

    async def post(self):
        body = self.json_body(RefreshRequest)
        self.write_json(await self.deps.refresh(body.refresh_token))


class RevokeHandler(UsersBase):
    """``POST /api/v1/tokens/revoke``: sign one login out (every refresh token of its family). Unknown
    tokens are 204 too: the answer tells nothing about a token."""

    public = {"POST"}

    async def post(self):
        body = self.json_body(RefreshRequest)
        await self.deps.refresh_tokens.revoke_login(accounts.hash_refresh_token(body.refresh_token))
        self.ctx.metrics.count("logouts")
        self.set_status(204)
        self.finish()


class JwksHandler(UsersBase):
    public = {"GET"}

    async def get(self):
        self.set_header("Cache-Control", "public, max-age=60")
        self.write_json({"keys": await self.deps.keys.published()})


class ServiceTokenHandler(UsersBase):
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
        signer = await self.deps.issuer.signer()
        token = signer.sign(f"service:{client_id}", "service", SERVICE_TOKEN_TTL)
        self.write_json({"access_token": token, "token_type": "Bearer", "expires_in": SERVICE_TOKEN_TTL})


def routes() -> list[tuple]:
    return [
        (r"/api/v1/users", UsersHandler),
        (r"/api/v1/users/me", MeHandler),
        (r"/api/v1/users/me/password", PasswordHandler),
        (r"/api/v1/tokens", TokensHandler),
        (r"/api/v1/tokens/refresh", RefreshHandler),
        (r"/api/v1/tokens/revoke", RevokeHandler),
        (r"/\.well-known/jwks\.json", JwksHandler),
        (r"/oauth/token", ServiceTokenHandler),
    ]

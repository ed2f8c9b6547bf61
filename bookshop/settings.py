"""Settings: one frozen dataclass built from the environment and validated at start-up."""
from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import secrets
import zoneinfo
from typing import Mapping
from urllib.parse import urlsplit

from bookshop import SERVICES


class SettingsError(ValueError):
    """A setting has a value we cannot run with; the message names it."""


@dataclasses.dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port_base: int = 8000
    data_dir: str = "./var"
    mongodb_uri: str | None = None
    db_prefix: str = "bookshop"
    admin_email: str | None = None
    admin_password: str | None = None
    demo_data: bool = True
    currency: str = "EUR"
    # the shop's day ("today's totals" count from local midnight): an IANA time zone name
    timezone: str = "UTC"
    access_token_ttl: int = 900
    reservation_ttl: int = 900
    allowed_origins: tuple[str, ...] = ()
    service_urls: Mapping[str, str] = dataclasses.field(default_factory=dict)
    service_secret: str = ""
    log_level: str = "INFO"
    # checkout: how long POST /orders waits for the saga before answering 202 PENDING
    checkout_wait: float = 5.0
    # a saga not finished by its owner within this many seconds is picked up by recovery
    saga_lease: float = 10.0
    # checkouts one orders process runs at once; as many more may wait, beyond that POST /orders is 503
    checkout_concurrency: int = 32
    # generous: under a checkout rush the embedded database makes reservations slow, not failed
    upstream_timeout: float = 10.0
    payments_latency_ms: int = 0
    payments_failure_rate: float = 0.0
    login_max_failures: int = 10
    login_lock_seconds: int = 60
    # registrations per client address per 10 minutes (0: no limit)
    registration_limit: int = 100
    # WebSocket connections per client address (0: no limit)
    ws_max_per_address: int = 2000
    # peers whose X-Forwarded-For is believed (addresses or CIDR ranges)
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    # span exporters (OTEL_TRACES_EXPORTER): none unless named, unlike the SDK's default (bookshop/tracing.py)
    traces_exporters: tuple[str, ...] = ()

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        """The shop's time zone (``BOOKSHOP_TIMEZONE``)."""
        return zoneinfo.ZoneInfo(self.timezone)

    def port(self, service: str) -> int:
        return self.port_base + SERVICES[service]

    def url(self, service: str) -> str:
        """Base URL of a service, from BOOKSHOP_<NAME>_URL or the all-in-one default."""
        if service in self.service_urls:
            return self.service_urls[service]
        return f"http://{self.host}:{self.port(service)}"

    def db_name(self, service: str) -> str:
        return f"{self.db_prefix}_{service}"

    @property
    def gateway_origins(self) -> tuple[str, ...]:
        if self.allowed_origins:
            return self.allowed_origins
        port = self.port("gateway")
        hosts = dict.fromkeys([self.host, "localhost", "127.0.0.1"])
        return tuple(f"http://{h}:{port}" for h in hosts)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        kw: dict = {}

        def text(name: str, field: str, default=None):
            value = env.get(name)
            if value is not None and value.strip() != "":
                kw[field] = value.strip()
            elif default is not None:
                kw[field] = default

        def bounded(name: str, field: str, lo: float, hi: float, parse=int, what: str = "an integer"):
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                return
            try:
                value = parse(raw)
            except ValueError:
                raise SettingsError(f"{name} must be {what}, got {raw!r}") from None
            if not lo <= value <= hi:
                raise SettingsError(f"{name} must be between {lo} and {hi}, got {value}")
            kw[field] = value

        integer = bounded
        number = functools.partial(bounded, parse=float, what="a number")

        def flag(name: str, field: str):
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                return
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                kw[field] = True
            elif raw.strip().lower() in ("0", "false", "no", "off"):
                kw[field] = False
            else:
                raise SettingsError(f"{name} must be 0 or 1, got {raw!r}")

        text("BOOKSHOP_HOST", "host")
        integer("BOOKSHOP_PORT_BASE", "port_base", 1, 65535 - max(SERVICES.values()))
        text("BOOKSHOP_DATA_DIR", "data_dir")
        text("MONGODB_URI", "mongodb_uri")
        text("BOOKSHOP_DB_PREFIX", "db_prefix")
        text("BOOKSHOP_ADMIN_EMAIL", "admin_email")
        text("BOOKSHOP_ADMIN_PASSWORD", "admin_password")
        flag("BOOKSHOP_DEMO_DATA", "demo_data")
        text("BOOKSHOP_CURRENCY", "currency")
        text("BOOKSHOP_TIMEZONE", "timezone")
        integer("BOOKSHOP_ACCESS_TOKEN_TTL", "access_token_ttl", 1, 3600)
        integer("BOOKSHOP_RESERVATION_TTL", "reservation_ttl", 1, 7 * 24 * 3600)
        text("BOOKSHOP_SERVICE_SECRET", "service_secret")
        text("BOOKSHOP_LOG_LEVEL", "log_level")
        number("BOOKSHOP_CHECKOUT_WAIT", "checkout_wait", 0.1, 60)
        number("BOOKSHOP_SAGA_LEASE", "saga_lease", 1, 3600)
        integer("BOOKSHOP_CHECKOUT_CONCURRENCY", "checkout_concurrency", 1, 10000)
        number("BOOKSHOP_UPSTREAM_TIMEOUT", "upstream_timeout", 0.1, 60)
        integer("BOOKSHOP_PAYMENTS_LATENCY_MS", "payments_latency_ms", 0, 60000)
        number("BOOKSHOP_PAYMENTS_FAILURE_RATE", "payments_failure_rate", 0, 1)
        # the contract: a lock after at most 10 failures in a row
        integer("BOOKSHOP_LOGIN_MAX_FAILURES", "login_max_failures", 1, 10)
        integer("BOOKSHOP_LOGIN_LOCK_SECONDS", "login_lock_seconds", 1, 86400)
        integer("BOOKSHOP_REGISTRATION_LIMIT", "registration_limit", 0, 1_000_000)
        integer("BOOKSHOP_WS_MAX_PER_ADDRESS", "ws_max_per_address", 0, 1_000_000)

        proxies = env.get("BOOKSHOP_TRUSTED_PROXIES", "").strip()
        if proxies:
            networks = []
            for entry in (p.strip() for p in proxies.split(",")):
                if not entry:
                    continue
                try:
                    networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    raise SettingsError(
                        f"BOOKSHOP_TRUSTED_PROXIES: {entry!r} is not an IP address or CIDR range") from None
            kw["trusted_proxies"] = tuple(networks)

        origins = env.get("BOOKSHOP_ALLOWED_ORIGINS", "").strip()
        if origins:
            parsed = tuple(o.strip().rstrip("/") for o in origins.split(",") if o.strip())
            for origin in parsed:
                parts = urlsplit(origin)
                if parts.scheme not in ("http", "https") or not parts.netloc:
                    raise SettingsError(f"BOOKSHOP_ALLOWED_ORIGINS: {origin!r} is not an http(s) origin")
            kw["allowed_origins"] = parsed

        kw["traces_exporters"] = traces_exporters(env)

        urls = {}
        for service in SERVICES:
            raw = env.get(f"BOOKSHOP_{service.upper()}_URL", "").strip()
            if raw:
                parts = urlsplit(raw)
                if parts.scheme not in ("http", "https") or not parts.netloc:
                    raise SettingsError(f"BOOKSHOP_{service.upper()}_URL must be an http(s) URL, got {raw!r}")
                urls[service] = raw.rstrip("/")
        kw["service_urls"] = urls

        settings = cls(**kw)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.mongodb_uri is not None:
            scheme = urlsplit(self.mongodb_uri).scheme
            if scheme not in ("mongodb", "mongodb+srv"):
                raise SettingsError(
                    f"MONGODB_URI must start with mongodb:// or mongodb+srv://, got scheme {scheme!r}")
        if len(self.currency) != 3 or not self.currency.isalpha() or not self.currency.isupper():
            raise SettingsError(f"BOOKSHOP_CURRENCY must be a three-letter code like EUR, got {self.currency!r}")
        try:
            self.zone
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise SettingsError(f"BOOKSHOP_TIMEZONE must be an IANA time zone name like Europe/Paris or UTC, "
                                f"got {self.timezone!r}") from None
        if (self.admin_email is None) != (self.admin_password is None):
            raise SettingsError("BOOKSHOP_ADMIN_EMAIL and BOOKSHOP_ADMIN_PASSWORD must be set together")
        if self.admin_password is not None and len(self.admin_password) < 8:
            raise SettingsError("BOOKSHOP_ADMIN_PASSWORD must be at least 8 characters")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise SettingsError(f"BOOKSHOP_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if not self.db_prefix.replace("_", "").isalnum():
            raise SettingsError(f"BOOKSHOP_DB_PREFIX may hold only letters, digits and _, got {self.db_prefix!r}")

    def with_secret(self) -> "Settings":
        """A copy with a service secret. The all-in-one mode generates one on first start and keeps it in
        the data dir (mode 0600), so what is signed with it (idempotency fingerprints, paging cursors)
        stays valid across restarts."""
        if self.service_secret:
            return self
        path = os.path.join(self.data_dir, "service_secret")
        try:
            with open(path) as fh:
                secret = fh.read().strip()
        except FileNotFoundError:
            secret = ""
        if not secret:
            os.makedirs(self.data_dir, exist_ok=True)
            secret = secrets.token_urlsafe(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secret)
        return dataclasses.replace(self, service_secret=secret)


def traces_exporters(env: Mapping[str, str]) -> tuple[str, ...]:
    """The span exporters ``OTEL_TRACES_EXPORTER`` names: ``otlp`` (OTLP over HTTP/protobuf), ``console``, both,
    or none (the default here, and with ``OTEL_SDK_DISABLED=true``)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in ("otlp", "console")]
    if unknown:
        raise SettingsError(f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} is not supported; use otlp, console, "
                            f"both (otlp,console) or none")
    if "otlp" in names:
        for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = env.get(var, "").strip()
            if protocol:
                if protocol != "http/protobuf":
                    raise SettingsError(f"{var}: only http/protobuf is supported, got {protocol!r}")
                break
    return tuple(dict.fromkeys(names))


def validate_service(name: str) -> str:
    if name not in SERVICES:
        raise SettingsError(f"unknown service {name!r}; choose one of {', '.join(SERVICES)}")
    return name

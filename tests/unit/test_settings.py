"""Settings.from_env: the defaults of the contract, and a clear SettingsError naming every bad variable."""
from __future__ import annotations

import dataclasses

import os

import pytest

from bookshop import SERVICES
from bookshop.settings import Settings, SettingsError, validate_service


def test_defaults_follow_the_contract():
    s = Settings.from_env({})
    assert s.host == "127.0.0.1"
    assert s.port_base == 8000
    assert s.data_dir == "./var"
    assert s.mongodb_uri is None
    assert s.demo_data is True
    assert s.currency == "EUR"
    assert s.access_token_ttl == 900
    assert s.reservation_ttl == 900
    assert s.admin_email is None and s.admin_password is None
    assert s.service_urls == {}
    assert s.login_max_failures <= 10


def test_ports_are_base_plus_the_contract_offsets():
    s = Settings.from_env({"BOOKSHOP_PORT_BASE": "9100"})
    assert {name: s.port(name) for name in SERVICES} == {
        "gateway": 9100, "users": 9101, "catalog": 9102, "inventory": 9103, "orders": 9104, "payments": 9105,
        "recommendations": 9106}
    assert s.url("catalog") == "http://127.0.0.1:9102"
    assert s.db_name("orders") == "bookshop_orders"


def test_service_urls_override_the_all_in_one_addresses():
    s = Settings.from_env({"BOOKSHOP_CATALOG_URL": "http://catalog.svc:80/", "BOOKSHOP_USERS_URL": "https://u"})
    assert s.url("catalog") == "http://catalog.svc:80"
    assert s.url("users") == "https://u"
    assert s.url("inventory") == "http://127.0.0.1:8003"


def test_default_origins_are_the_gateway_on_its_host_localhost_and_loopback():
    assert set(Settings.from_env({}).gateway_origins) == {"http://127.0.0.1:8000", "http://localhost:8000"}
    s = Settings.from_env({"BOOKSHOP_HOST": "shop.example", "BOOKSHOP_PORT_BASE": "7000"})
    assert s.gateway_origins == ("http://shop.example:7000", "http://localhost:7000", "http://127.0.0.1:7000")


def test_configured_origins_replace_the_default():
    s = Settings.from_env({"BOOKSHOP_ALLOWED_ORIGINS": " https://a.example/ , http://b.example:81 ,"})
    assert s.gateway_origins == ("https://a.example", "http://b.example:81")


def test_values_are_read_and_trimmed():
    s = Settings.from_env({
        "BOOKSHOP_HOST": " 0.0.0.0 ", "BOOKSHOP_ACCESS_TOKEN_TTL": "3600", "BOOKSHOP_RESERVATION_TTL": "5",
        "BOOKSHOP_DEMO_DATA": "0", "BOOKSHOP_CURRENCY": "USD", "MONGODB_URI": "mongodb://db:27017",
        "BOOKSHOP_ADMIN_EMAIL": "boss@shop.test", "BOOKSHOP_ADMIN_PASSWORD": "long-enough",
        "BOOKSHOP_DB_PREFIX": "shop_2", "BOOKSHOP_PORT_BASE": "", "BOOKSHOP_LOG_LEVEL": "debug",
    })
    assert s.host == "0.0.0.0"
    assert s.access_token_ttl == 3600
    assert s.reservation_ttl == 5
    assert s.demo_data is False
    assert s.currency == "USD"
    assert s.mongodb_uri == "mongodb://db:27017"
    assert s.db_name("users") == "shop_2_users"
    assert s.port_base == 8000  # empty means unset


def test_settings_are_frozen():
    s = Settings.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port_base = 1  # type: ignore[misc]


@pytest.mark.parametrize("name, value", [
    ("BOOKSHOP_PORT_BASE", "eight thousand"),
    ("BOOKSHOP_PORT_BASE", "0"),
    ("BOOKSHOP_PORT_BASE", "65530"),  # the recommendations port would not exist
    ("BOOKSHOP_PORT_BASE", "80.5"),
    ("BOOKSHOP_ACCESS_TOKEN_TTL", "3601"),
    ("BOOKSHOP_ACCESS_TOKEN_TTL", "86400"),
    ("BOOKSHOP_ACCESS_TOKEN_TTL", "0"),
    ("BOOKSHOP_ACCESS_TOKEN_TTL", "-5"),
    ("BOOKSHOP_ACCESS_TOKEN_TTL", "15m"),
    ("BOOKSHOP_RESERVATION_TTL", "0"),
    ("BOOKSHOP_RESERVATION_TTL", "soon"),
    ("BOOKSHOP_DEMO_DATA", "maybe"),
    ("BOOKSHOP_CURRENCY", "eur"),
    ("BOOKSHOP_CURRENCY", "EURO"),
    ("BOOKSHOP_CURRENCY", "E1R"),
    ("MONGODB_URI", "http://db:27017"),
    ("MONGODB_URI", "db:27017"),
    ("BOOKSHOP_DB_PREFIX", "shop-1"),
    ("BOOKSHOP_DB_PREFIX", "a.b"),
    ("BOOKSHOP_ALLOWED_ORIGINS", "ftp://files.example"),
    ("BOOKSHOP_ALLOWED_ORIGINS", "localhost:8000"),
    ("BOOKSHOP_CATALOG_URL", "catalog:8002"),
    ("BOOKSHOP_USERS_URL", "ws://users"),
    ("BOOKSHOP_CHECKOUT_WAIT", "nan"),
    ("BOOKSHOP_CHECKOUT_WAIT", "inf"),
    ("BOOKSHOP_UPSTREAM_TIMEOUT", "0"),
    ("BOOKSHOP_PAYMENTS_FAILURE_RATE", "1.5"),
    ("BOOKSHOP_LOGIN_MAX_FAILURES", "0"),
])
def test_each_bad_value_is_refused_naming_its_variable(name, value):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: value})
    assert name in str(info.value)


def test_an_unknown_log_level_is_refused():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"BOOKSHOP_LOG_LEVEL": "LOUD"})
    assert "BOOKSHOP_LOG_LEVEL" in str(info.value)


def test_admin_email_and_password_go_together():
    for env in ({"BOOKSHOP_ADMIN_EMAIL": "a@b.co"}, {"BOOKSHOP_ADMIN_PASSWORD": "long-enough"}):
        with pytest.raises(SettingsError) as info:
            Settings.from_env(env)
        assert "BOOKSHOP_ADMIN_EMAIL" in str(info.value) and "BOOKSHOP_ADMIN_PASSWORD" in str(info.value)
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"BOOKSHOP_ADMIN_EMAIL": "a@b.co", "BOOKSHOP_ADMIN_PASSWORD": "short"})
    assert "BOOKSHOP_ADMIN_PASSWORD" in str(info.value)


def test_a_service_secret_is_generated_only_when_none_is_set_and_kept_in_the_data_dir(tmp_path):
    data = str(tmp_path / "var")
    generated = Settings.from_env({"BOOKSHOP_DATA_DIR": data}).with_secret()
    assert len(generated.service_secret) >= 32
    # the next start reuses it: idempotency fingerprints and cursors stay valid across restarts
    assert Settings.from_env({"BOOKSHOP_DATA_DIR": data}).with_secret().service_secret == generated.service_secret
    assert oct(os.stat(os.path.join(data, "service_secret")).st_mode & 0o777) == "0o600"
    other = Settings.from_env({"BOOKSHOP_DATA_DIR": str(tmp_path / "other")}).with_secret()
    assert other.service_secret != generated.service_secret
    given = Settings.from_env({"BOOKSHOP_SERVICE_SECRET": "shared-secret"})
    assert given.with_secret().service_secret == "shared-secret"


def test_service_names_are_checked():
    assert validate_service("orders") == "orders"
    with pytest.raises(SettingsError) as info:
        validate_service("shipping")
    assert "shipping" in str(info.value) and "gateway" in str(info.value)


def test_hardening_limits_have_the_contract_defaults():
    s = Settings.from_env({})
    assert (s.registration_limit, s.ws_max_per_address, s.trusted_proxies) == (100, 2000, ())


def test_trusted_proxies_are_addresses_or_ranges():
    s = Settings.from_env({"BOOKSHOP_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1,2001:db8::/32"})
    assert [str(n) for n in s.trusted_proxies] == ["10.0.0.0/8", "192.168.1.1/32", "2001:db8::/32"]
    with pytest.raises(SettingsError, match="BOOKSHOP_TRUSTED_PROXIES"):
        Settings.from_env({"BOOKSHOP_TRUSTED_PROXIES": "10.0.0.0/8,proxy.local"})

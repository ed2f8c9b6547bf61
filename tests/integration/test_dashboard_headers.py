"""The dashboard page's own headers (``GET /`` at the gateway): it cannot be framed, its scripts can reach only
its own origin (HTTP and WebSocket), and no form or base URL can point elsewhere."""
from __future__ import annotations

import urllib.request


def policy(header: str) -> dict[str, list[str]]:
    directives = {}
    for part in header.split(";"):
        name, *sources = part.split()
        directives[name] = sources
    return directives


def test_the_dashboard_cannot_be_framed_and_connects_only_to_its_own_origin(shop):
    with urllib.request.urlopen(shop.url("gateway") + "/", timeout=20) as resp:
        headers = resp.headers
        assert resp.status == 200 and headers["Content-Type"].startswith("text/html")
        assert b'<form id="signin-form"' in resp.read()
    csp = policy(headers["Content-Security-Policy"])
    assert headers["X-Frame-Options"] == "DENY"
    assert csp["frame-ancestors"] == ["'none'"]
    # 'self' alone: it matches the page's own ws:/wss: origin; a bare ws: or wss: would allow any host
    assert csp["connect-src"] == ["'self'"]
    assert csp["default-src"] == ["'self'"]
    # neither falls back to default-src
    assert csp["base-uri"] == ["'none'"]
    assert csp["form-action"] == ["'self'"]
    assert csp["object-src"] == ["'none'"]


def test_the_sign_in_form_posts_so_a_password_never_lands_in_a_url(shop):
    # if the form is submitted before dashboard.js takes it over (or if the script failed to load), a form
    # without a method would send GET /?email=…&password=… (browser history, proxies' logs, Referer)
    with urllib.request.urlopen(shop.url("gateway") + "/", timeout=20) as resp:
        page = resp.read().decode()
    form = page[page.index('<form id="signin-form"'):]
    form = form[:form.index(">")]
    assert 'method="post"' in form, form

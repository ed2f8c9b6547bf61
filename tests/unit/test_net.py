"""Client addresses: X-Forwarded-For is believed only from the trusted proxies, and only its right-most
untrusted entry (what the client wrote itself proves nothing)."""
from __future__ import annotations

import ipaddress

import pytest

from bookshop.net import client_address

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32"))


@pytest.mark.parametrize("peer, forwarded, expected", [
    ("203.0.113.9", None, "203.0.113.9"),                        # no proxy header
    ("203.0.113.9", "1.2.3.4", "203.0.113.9"),                   # an untrusted peer's header is ignored
    ("127.0.0.1", "1.2.3.4", "1.2.3.4"),                         # a trusted proxy names the client
    ("127.0.0.1", "6.6.6.6, 1.2.3.4", "1.2.3.4"),                # the client's own entry is skipped
    ("127.0.0.1", "6.6.6.6, 1.2.3.4, 10.0.0.7", "1.2.3.4"),      # through two proxies
    ("127.0.0.1", "10.0.0.8, 10.0.0.7", "10.0.0.8"),             # only proxies: the left-most
    ("127.0.0.1", "1.2.3.4, not-an-ip", "127.0.0.1"),            # garbage: the peer is all we know
    ("127.0.0.1", "2001:db8::1", "2001:db8::1"),
    (None, None, "unknown"),
])
def test_client_address(peer, forwarded, expected):
    assert client_address(peer, forwarded, PROXIES) == expected


def test_without_trusted_proxies_the_peer_is_the_client():
    assert client_address("127.0.0.1", "1.2.3.4", ()) == "127.0.0.1"

"""Who is asking: the client address behind any trusted proxies (``BOOKSHOP_TRUSTED_PROXIES``)."""
from __future__ import annotations

import ipaddress
from typing import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: an address is a key of in-memory and stored counters: never longer than this
MAX_ADDRESS = 64


def _ip(text: str):
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def trusted(address: str, proxies: Iterable[Network]) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip in net for net in proxies)


def client_address(peer: str | None, forwarded_for: str | None, proxies: Iterable[Network]) -> str:
    """The peer's address, unless the peer is a trusted proxy: then the right-most entry of
    ``X-Forwarded-For`` that is not itself a trusted proxy (entries to its left were written by the client
    and prove nothing). A chain of trusted proxies only gives the left-most entry."""
    proxies = tuple(proxies)
    peer = (peer or "unknown")[:MAX_ADDRESS]
    if not proxies or not forwarded_for or not trusted(peer, proxies):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if _ip(hop) is None:
            return peer  # garbage in the chain: the proxy that passed it on is all we know
        if not trusted(hop, proxies):
            return str(_ip(hop))[:MAX_ADDRESS]
    return str(_ip(hops[0]))[:MAX_ADDRESS] if hops else peer

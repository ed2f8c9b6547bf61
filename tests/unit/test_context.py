"""The service context: each collector once in the registry."""
from __future__ import annotations

import asyncio

from bookshop.clients.services import CatalogClient
from bookshop.context import ServiceContext
from bookshop.settings import Settings


def test_the_circuit_breaker_series_are_exported_once():
    async def scenario():
        ctx = ServiceContext("orders", Settings(service_secret="s"), with_db=False)
        try:
            CatalogClient(ctx.http, "http://127.0.0.1:9", ctx.tokens, timeout=1.0)
            return ctx.metrics.render()
        finally:
            await ctx.close()
    loop = asyncio.new_event_loop()  # not asyncio.run: it would drop pytest-tornado's global loop unclosed
    try:
        text = loop.run_until_complete(scenario())
    finally:
        loop.close()
    text = text.decode() if isinstance(text, bytes) else text
    lines = [line for line in text.splitlines() if line.startswith("bookshop_upstream_circuit_open{")]
    assert len(lines) == len(set(lines)) >= 1, lines

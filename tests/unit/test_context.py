"""The service context: each collector once in the registry."""
from __future__ import annotations

import asyncio
import gc

from bookshop.clients.services import CatalogClient
from bookshop.context import ServiceContext
from bookshop.settings import Settings


def test_the_circuit_breaker_series_are_exported_once():
    async def scenario():
        ctx = ServiceContext("orders", Settings(service_secret="s"), with_db=False)
        try:
            # held until the scrape: the session lists its clients weakly, and a collection of the garbage
            # cycles (whenever it runs) would otherwise take an unreferenced client away first
            client = CatalogClient(ctx.http, "http://127.0.0.1:9", ctx.tokens, timeout=1.0)
            gc.collect()  # a live client is exported whenever the collection runs
            text = ctx.metrics.render()
            assert client.breaker is not None
            return text
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

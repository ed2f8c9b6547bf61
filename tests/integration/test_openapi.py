"""The API description is served by the gateway from its one source file, and says what the routes are."""
from __future__ import annotations

import os
import re

import aiohttp
import pytest
import yaml

from bookshop.handlers import gateway
from harness import ROOT


def source() -> dict:
    with open(os.path.join(ROOT, "docs", "openapi.yaml"), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.mark.gen_test
async def test_the_gateway_serves_the_description_publicly(shop):
    async with aiohttp.ClientSession() as session:
        async with session.get(shop.api + "/openapi.json") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("application/json")
            served = await r.json()
    assert served == source()
    assert served["openapi"].startswith("3.1")


def test_every_public_route_of_the_gateway_is_described():
    paths = source()["paths"]
    described = {re.sub(r"\{[^}]+\}", "{}", p) for p in paths}
    for pattern, *_ in gateway.routes():
        if pattern == "/" or pattern.startswith("/static/"):
            continue  # the dashboard page and its assets: HTML for browsers, not the API
        pattern = pattern.replace("\\", "")
        alternatives = re.search(r"\(((?:[a-z]+\|)+[a-z]+)\)", pattern)  # (cancel|ship): one route each
        for word in alternatives.group(1).split("|") if alternatives else [None]:
            route = pattern.replace(alternatives.group(0), word) if word else pattern
            route = re.sub(r"\([^)]*\)", "{}", route)
            assert route in described, f"{route} is served but not described"

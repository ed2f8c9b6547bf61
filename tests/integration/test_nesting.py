"""Deeply nested JSON is a clean 400 ``malformed_json`` on every service and through the gateway (it was a
500 from a RecursionError), and the service keeps serving."""
from __future__ import annotations

import uuid

import aiohttp
import pytest

from client import Api

DEEP = ("[" * 100_000 + "]" * 100_000).encode()
OVER = ("[" * 33 + "]" * 33).encode()


@pytest.mark.gen_test(timeout=60)
async def test_nested_json_is_400_malformed_json_everywhere(shop):
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        customer = await api.customer()
        staff = await api.staff()
        service = await api.service("orders")
        cases = [
            (api, "POST", shop.api + "/users", {}),
            (customer, "POST", shop.api + "/orders", {"Idempotency-Key": uuid.uuid4().hex}),
            (customer, "PUT", shop.api + "/cart/items/9780306406157", {}),
            (staff, "POST", shop.api + "/books", {}),
            (staff, "POST", shop.api + "/inventory/9780306406157/restock", {}),
            (api, "POST", shop.url("users") + "/api/v1/users", {}),
            (customer, "POST", shop.url("orders") + "/api/v1/orders", {"Idempotency-Key": uuid.uuid4().hex}),
            (staff, "POST", shop.url("catalog") + "/api/v1/books", {}),
            (staff, "POST", shop.url("inventory") + "/api/v1/inventory/9780306406157/restock", {}),
        ]
        cases.append((service, "POST", shop.url("payments") + "/internal/charges", {}))
        for caller, method, url, headers in cases:
            for body in (DEEP, OVER):
                r = await caller.call(method, url, raw=body, headers=headers)
                assert r.status == 400, (url, len(body), r)
                assert r.body["error"]["code"] == "malformed_json", (url, r.body)
        # and the services still serve
        assert (await api.get("/books")).status == 200
        assert (await customer.get("/cart")).status == 200

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


def test_every_request_body_has_examples_that_its_schema_accepts():
    import jsonschema
    import referencing
    doc = source()
    registry = referencing.Registry().with_resource("urn:bookshop", referencing.Resource.from_contents(
        doc, default_specification=referencing.jsonschema.DRAFT202012))
    checked = 0
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            body = operation.get("requestBody") if isinstance(operation, dict) else None
            if body is None:
                continue
            content = body["content"]["application/json"]
            examples = [content["example"]] if "example" in content else \
                [e["value"] for e in content.get("examples", {}).values()]
            assert examples, f"{method.upper()} {path} has no request example"
            schema = {"$ref": "urn:bookshop#" + content["schema"]["$ref"].lstrip("#")} \
                if "$ref" in content["schema"] else content["schema"]
            validator = jsonschema.Draft202012Validator(schema, registry=registry)
            for example in examples:
                errors = [e.message for e in validator.iter_errors(example)]
                assert not errors, f"{method.upper()} {path}: example {example} fails its schema: {errors}"
                checked += 1
    assert checked >= 11


def test_post_books_and_post_orders_link_to_the_operations_that_use_their_ids():
    paths = source()["paths"]
    book_links = paths["/api/v1/books"]["post"]["responses"]["201"]["links"]
    linked = {link["operationId"] for link in book_links.values()}
    assert {"getBookPage", "updateBook", "deleteBook", "restock"} <= linked
    for status in ("201", "202"):
        order_links = paths["/api/v1/orders"]["post"]["responses"][status]["links"]
        assert {link["operationId"] for link in order_links.values()} == {
            "getOrder", "getOrderPayments", "cancelOrder", "shipOrder"}

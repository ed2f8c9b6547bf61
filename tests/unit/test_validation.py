"""Strict request validation: malformed JSON, strict types, unknown fields and operator-looking keys."""
from __future__ import annotations

import json

import pytest

from bookshop.services.errors import InvalidInput
from bookshop.validation import StrictModel, check_operators, parse_json, validate


class Line(StrictModel):
    isbn: str
    quantity: int


class Order(StrictModel):
    items: list[Line]
    note: str | None = None
    gift: bool = False


def invalid(model, data) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        validate(model, data)
    assert info.value.code == "invalid_field"
    return info.value


def test_a_valid_body_parses():
    order = validate(Order, parse_json(b'{"items": [{"isbn": "9780306406157", "quantity": 2}]}'))
    assert order.items[0].quantity == 2 and order.gift is False


@pytest.mark.parametrize("raw", [
    b"", b"{", b'{"a": 1,}', b"{'a': 1}", b"nul", b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}',
    b'[1, NaN]', b"\xff\xfe{}", b'{"a": "\xff"}',
])
def test_malformed_json_is_refused(raw):
    with pytest.raises(InvalidInput) as info:
        parse_json(raw)
    assert info.value.code == "malformed_json"


@pytest.mark.parametrize("data, field", [
    ({"items": [{"isbn": "x", "quantity": "7"}]}, "items[0].quantity"),
    ({"items": [{"isbn": "x", "quantity": 7.0}]}, "items[0].quantity"),
    ({"items": [{"isbn": "x", "quantity": True}]}, "items[0].quantity"),
    ({"items": [{"isbn": 9780306406157, "quantity": 1}]}, "items[0].isbn"),
    ({"items": [{"isbn": "x", "quantity": None}]}, "items[0].quantity"),
    ({"items": {"isbn": "x", "quantity": 1}}, "items"),
    ({"items": [{"isbn": "x", "quantity": 1}], "gift": "yes"}, "gift"),
    ({"items": [{"isbn": "x", "quantity": 1}], "gift": 1}, "gift"),
    ({"items": [{"isbn": "x"}]}, "items[0].quantity"),
    ({}, "items"),
])
def test_types_are_strict_and_the_message_names_the_field(data, field):
    error = invalid(Order, data)
    assert error.message.startswith(field + ":")
    assert error.details["field"] == field


@pytest.mark.parametrize("data, field", [
    ({"items": [], "admin": True}, "admin"),
    ({"items": [{"isbn": "x", "quantity": 1, "price_cents": 0}]}, "items[0].price_cents"),
])
def test_unknown_fields_are_refused(data, field):
    error = invalid(Order, data)
    assert error.message == f"{field}: unknown field"


@pytest.mark.parametrize("data", [[], "text", 7, None, [{"items": []}]])
def test_the_body_must_be_an_object(data):
    error = invalid(Order, data)
    assert error.details["field"] == "body"


@pytest.mark.parametrize("doc, field", [
    ({"$where": "1"}, "body"),
    ({"email": {"$gt": ""}}, "email"),
    ({"items": [{"isbn": {"$ne": None}, "quantity": 1}]}, "items[0].isbn"),
    ({"a": {"b": [[{"$regex": ".*"}]]}}, "a.b[0][0]"),
    ({"a\x00b": 1}, "body"),
])
def test_operator_looking_keys_are_refused_anywhere(doc, field):
    with pytest.raises(InvalidInput) as info:
        parse_json(json.dumps(doc).encode())
    assert info.value.code == "invalid_field"
    assert info.value.details["field"] == field
    assert field in info.value.message


def test_dollar_signs_in_values_and_inside_keys_are_data():
    check_operators({"title": "$gt", "price$": 1, "tags": ["$ne", {"a$b": 1}]})


def test_operator_values_are_not_strings_for_the_model():
    error = invalid(Line, {"isbn": {"gt": ""}, "quantity": 1})
    assert error.details["field"] == "isbn"


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_nesting_deeper_than_32_levels_is_malformed_json(depth):
    for raw in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        with pytest.raises(InvalidInput) as info:
            parse_json(raw.encode())
        assert info.value.code == "malformed_json" and "32 levels" in info.value.message


def test_32_levels_are_allowed():
    value = parse_json(("[" * 32 + "]" * 32).encode())
    for _ in range(31):
        value = value[0]
    assert value == []
    assert parse_json(b'{"items": [{"isbn": "x"}]}') == {"items": [{"isbn": "x"}]}  # 3 levels

"""Strict input validation.

We use pydantic v2 models in strict mode (``strict=True``: ``"7"`` is not an int, no coercion) with
``extra="forbid"`` (unknown fields are errors). Pydantic is maintained, fast (Rust core) and gives
errors with the location of the bad field, which we put in the message. Before validation the raw JSON
is walked once to reject operator-looking keys (``$gt``) anywhere, so nothing shaped like a MongoDB
operator ever reaches a query.
"""
from __future__ import annotations

import json
from typing import Any, TypeVar

import pydantic

from bookshop.services.errors import InvalidInput

T = TypeVar("T", bound=pydantic.BaseModel)

#: each array or object is one level (a top-level ``{}`` is level 1); deeper documents are malformed
MAX_DEPTH = 32


class StrictModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, extra="forbid", str_strip_whitespace=False,
                                       frozen=True)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes | str) -> Any:
    """Strict JSON: no NaN/Infinity, at most ``MAX_DEPTH`` levels, no operator-looking keys."""
    if not raw:
        raise InvalidInput("request body must be JSON", code="malformed_json")
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"malformed JSON: {exc}", code="malformed_json") from None
    except RecursionError:
        # the C decoder gives up cleanly far beyond MAX_DEPTH (thousands of levels): same answer
        raise InvalidInput(f"malformed JSON: nested deeper than {MAX_DEPTH} levels", code="malformed_json") from None
    check_operators(value)
    return value


def check_operators(value: Any, path: str = "", depth: int = 1) -> None:
    """Reject ``$``-prefixed keys anywhere in a JSON document (``{"$gt": ""}``), and nesting deeper than
    ``MAX_DEPTH`` (checked on the way down, so the walk itself stays shallow)."""
    if isinstance(value, (dict, list)) and depth > MAX_DEPTH:
        raise InvalidInput(f"malformed JSON: nested deeper than {MAX_DEPTH} levels", code="malformed_json")
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if key.startswith("$") or "\x00" in key:
                raise InvalidInput(f"{path or 'body'}: operator-like key {key!r} is not allowed",
                                   code="invalid_field", details={"field": path or "body"})
            check_operators(item, where, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_operators(item, f"{path}[{i}]", depth + 1)


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def validate(model: type[T], data: Any) -> T:
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object", code="invalid_field",
                           details={"field": "body"})
    try:
        return model.model_validate(data, strict=True)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        first = errors[0]
        field = _loc(first["loc"])
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown field"
        raise InvalidInput(f"{field}: {message}", code="invalid_field",
                           details={"field": field,
                                    "errors": [{"field": _loc(e["loc"]), "message": e["msg"]}
                                               for e in errors[:10]]}) from None

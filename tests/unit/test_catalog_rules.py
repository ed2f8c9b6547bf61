"""Catalogue rules without a server: search words, book field checks, signed cursors, page limits."""
from __future__ import annotations

import base64
import json

import pytest

from bookshop.services.catalog import (DEFAULT_LIMIT, MAX_LIMIT, CursorCodec, check_book_fields, page_limit,
                                       search_words, words)
from bookshop.services.errors import InvalidInput

GOOD = {"title": "  Dune ", "authors": [" Frank Herbert "], "category": " Science Fiction ", "price_cents": 1299,
        "currency": "EUR", "description": None, "published_year": 1965}


# -- words ------------------------------------------------------------------------------------------------
def test_words_are_lowercase_folded_alphanumeric_runs_without_duplicates():
    assert words("The Lord of the Rings") == ["the", "lord", "of", "rings"]
    assert words("Gabriel García Márquez", "GARCIA") == ["gabriel", "garcia", "marquez"]
    assert words("C++ & Rust: 2nd-edition!") == ["c", "rust", "2nd", "edition"]
    assert words("", "   ", "!!!") == []


def test_words_are_capped_and_fold_compatibility_characters():
    assert words("a" * 100) == ["a" * 40]
    assert words("ﬁre") == ["fire"]          # the "fi" ligature folds to two letters
    assert words("Ｄｕｎｅ") == ["dune"]      # full-width letters fold to ASCII
    assert words("東京") == []                # no ASCII form: not searchable by word, never an error


def test_search_words_cover_title_and_authors_and_authors_alone():
    sw = search_words({"title": "Dune Messiah", "authors": ["Frank Herbert", "Brian Herbert"]})
    assert sw["words"] == ["dune", "messiah", "frank", "herbert", "brian"]
    assert sw["author_words"] == ["frank", "herbert", "brian"]


# -- check_book_fields ----------------------------------------------------------------------------------
def test_good_book_is_cleaned():
    clean = check_book_fields(GOOD, "EUR")
    assert clean["title"] == "Dune"
    assert clean["authors"] == ["Frank Herbert"]
    assert clean["category"] == "science fiction"
    assert clean["price_cents"] == 1299
    assert GOOD["title"] == "  Dune "  # the input is not modified


def test_a_patch_checks_only_what_it_has():
    assert check_book_fields({"price_cents": 1}, "EUR") == {"price_cents": 1}
    assert check_book_fields({}, "EUR") == {}
    assert check_book_fields({"description": None, "published_year": None}, "EUR") == {
        "description": None, "published_year": None}


@pytest.mark.parametrize("field, value", [
    ("title", ""), ("title", "   "), ("title", "x" * 301),
    ("authors", []), ("authors", [""]), ("authors", ["  "]), ("authors", ["a"] * 21), ("authors", ["x" * 201]),
    ("category", ""), ("category", "sci/fi"), ("category", "-horror"), ("category", "x" * 51),
    ("category", "$gt"),
    ("price_cents", 0), ("price_cents", -1), ("price_cents", 100_000_001),
    ("currency", "USD"), ("currency", "eur"),
    ("description", "x" * 5001),
    ("published_year", 1399), ("published_year", 2101),
])
def test_bad_values_name_their_field(field, value):
    with pytest.raises(InvalidInput) as err:
        check_book_fields({**GOOD, field: value}, "EUR")
    assert err.value.message.startswith(field + ":")
    assert err.value.code == "invalid_field"
    assert err.value.details == {"field": field}


@pytest.mark.parametrize("field, value", [
    ("title", "x" * 300), ("authors", ["a"] * 20), ("category", "x" * 50), ("category", "9 to 5"),
    ("price_cents", 100_000_000), ("description", "x" * 5000), ("published_year", 1400),
    ("published_year", 2100),
])
def test_values_at_the_limits_are_accepted(field, value):
    check_book_fields({**GOOD, field: value}, "EUR")


def test_the_shop_currency_is_a_setting():
    assert check_book_fields({"currency": "GBP"}, "GBP") == {"currency": "GBP"}
    with pytest.raises(InvalidInput, match="the shop sells in GBP"):
        check_book_fields({"currency": "EUR"}, "GBP")


# -- cursors ----------------------------------------------------------------------------------------------
def test_cursor_round_trips_and_is_opaque():
    codec = CursorCodec("secret")
    cursor = codec.encode({"after": "9780306406157"})
    assert codec.decode(cursor) == {"after": "9780306406157"}
    assert "9780306406157" not in cursor
    assert cursor == cursor.strip("=")  # URL-safe, no padding
    assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _unsign(cursor: str) -> tuple[bytes, bytes]:
    blob = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    return blob[:12], blob[12:]


def _sign(mac: bytes, raw: bytes) -> str:
    return base64.urlsafe_b64encode(mac + raw).rstrip(b"=").decode()


def test_edited_cursor_is_refused():
    codec = CursorCodec("secret")
    mac, raw = _unsign(codec.encode({"after": "9780306406157"}))
    edited = raw.replace(b"9780306406157", b"9780000000002")
    with pytest.raises(InvalidInput, match="^cursor:"):
        codec.decode(_sign(mac, edited))


def test_forged_cursor_is_refused():
    forged = _sign(b"\0" * 12, json.dumps({"after": ""}).encode())
    with pytest.raises(InvalidInput, match="^cursor:"):
        CursorCodec("secret").decode(forged)
    # signed with another server's secret
    with pytest.raises(InvalidInput, match="^cursor:"):
        CursorCodec("secret").decode(CursorCodec("other").encode({"after": ""}))


@pytest.mark.parametrize("garbage", [
    "", "x", "abc", "%%%", "é", "=" * 8, "A" * 600, "\x00",
    base64.urlsafe_b64encode(b"short").decode(),
])
def test_garbage_cursor_is_invalid_input(garbage):
    with pytest.raises(InvalidInput) as err:
        CursorCodec("secret").decode(garbage)
    assert err.value.details == {"field": "cursor"}


def test_signed_but_not_an_object_or_not_json_is_refused():
    import hashlib
    import hmac
    codec = CursorCodec("secret")
    key = hashlib.sha256(b"cursor:secret").digest()
    for raw in (b"[1, 2]", b"\"after\"", b"\xff\xfe", b"{not json"):
        mac = hmac.new(key, raw, hashlib.sha256).digest()[:12]
        with pytest.raises(InvalidInput, match="^cursor:"):
            codec.decode(_sign(mac, raw))


# -- limits -----------------------------------------------------------------------------------------------
def test_page_limit_default_and_bounds():
    assert page_limit(None) == DEFAULT_LIMIT == 20
    assert page_limit("1") == 1
    assert page_limit(str(MAX_LIMIT)) == MAX_LIMIT == 100


@pytest.mark.parametrize("raw", ["", "0", "101", "-1", "abc", "1.5", " 5", "5 ", "+5", "1e2", "²", "١٠", "１０"])
def test_page_limit_refuses_anything_but_1_to_100(raw):
    with pytest.raises(InvalidInput) as err:
        page_limit(raw)
    assert err.value.details == {"field": "limit"}

"""Books: the rules of a catalogue entry, search words and opaque, signed paging cursors."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import unicodedata

from bookshop.services.errors import InvalidInput

MAX_LIMIT = 100
DEFAULT_LIMIT = 20
_WORD = re.compile(r"[a-z0-9]+")


def words(*texts: str) -> list[str]:
    """Normalised search words: lowercase, accents folded, alphanumeric runs, de-duplicated."""
    out: dict[str, None] = {}
    for text in texts:
        folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
        for word in _WORD.findall(folded):
            out[word[:40]] = None
    return list(out)


def _bad(field: str, message: str) -> InvalidInput:
    return InvalidInput(f"{field}: {message}", code="invalid_field", details={"field": field})


def check_book_fields(fields: dict, currency: str) -> dict:
    """Validate the values of a new book or a patch (types are already strict); returns cleaned values."""
    clean = dict(fields)
    if "title" in clean:
        clean["title"] = clean["title"].strip()
        if not 1 <= len(clean["title"]) <= 300:
            raise _bad("title", "must be 1 to 300 characters")
    if "authors" in clean:
        authors = [a.strip() for a in clean["authors"]]
        if not 1 <= len(authors) <= 20 or any(not 1 <= len(a) <= 200 for a in authors):
            raise _bad("authors", "must list 1 to 20 names of 1 to 200 characters")
        clean["authors"] = authors
    if "category" in clean:
        clean["category"] = clean["category"].strip().lower()
        if not re.fullmatch(r"[a-z0-9][a-z0-9 -]{0,49}", clean["category"]):
            raise _bad("category", "must be 1 to 50 letters, digits, spaces or hyphens")
    if "price_cents" in clean and not 0 < clean["price_cents"] <= 100_000_000:
        raise _bad("price_cents", "must be a positive integer number of cents")
    if "currency" in clean and clean["currency"] != currency:
        raise _bad("currency", f"the shop sells in {currency}")
    if clean.get("description") is not None and len(clean["description"]) > 5000:
        raise _bad("description", "must be at most 5000 characters")
    if clean.get("published_year") is not None and not 1400 <= clean["published_year"] <= 2100:
        raise _bad("published_year", "must be a year between 1400 and 2100")
    return clean


def search_words(book: dict) -> dict:
    return {"words": words(book["title"], *book["authors"]), "author_words": words(*book["authors"])}


class CursorCodec:
    """Opaque paging cursors: the position, HMAC-signed so a forged or edited cursor is refused."""

    def __init__(self, secret: str):
        self._key = hashlib.sha256(("cursor:" + secret).encode()).digest()

    def encode(self, position: dict) -> str:
        raw = json.dumps(position, separators=(",", ":")).encode()
        mac = hmac.new(self._key, raw, hashlib.sha256).digest()[:12]
        return base64.urlsafe_b64encode(mac + raw).rstrip(b"=").decode()

    def decode(self, cursor: str) -> dict:
        try:
            blob = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            mac, raw = blob[:12], blob[12:]
            expected = hmac.new(self._key, raw, hashlib.sha256).digest()[:12]
            if len(cursor) > 512 or not hmac.compare_digest(mac, expected):
                raise ValueError
            position = json.loads(raw)
            if not isinstance(position, dict):
                raise ValueError
            return position
        except ValueError:
            raise _bad("cursor", "not a cursor this server issued") from None


def page_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    # ASCII only: str.isdigit() also accepts "²" (int() then fails) and other scripts' digits
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        raise _bad("limit", f"must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)

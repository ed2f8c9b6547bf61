"""Recommendations service: what to read next.

For now: books of the same category as the given one, newest first, never the book itself and never one
the signed-in customer already bought. Signed in without ``isbn``: books from the categories they bought.
"""
from __future__ import annotations

import time

from bookshop.handlers.base import BaseHandler
from bookshop.services import errors
from bookshop.services.isbn import normalize_isbn

LIMIT = 5
CACHE_SECONDS = 10.0


class RecommendationsHandler(BaseHandler):
    public = {"GET"}

    async def category_books(self, category: str) -> list[dict]:
        cache = self.ctx.deps["category_cache"]
        hit = cache.get(category)
        if hit and time.monotonic() - hit[0] < CACHE_SECONDS:
            return hit[1]
        page = await self.ctx.deps["catalog"].search({"category": category, "limit": "100"})
        books = sorted(page["items"], key=lambda b: (-(b.get("published_year") or 0), b["isbn"]))
        if len(cache) > 1000:
            cache.clear()
        cache[category] = (time.monotonic(), books)
        return books

    async def get(self):
        catalog = self.ctx.deps["catalog"]
        raw = self.get_query_argument("isbn", None)
        bought: set[str] = set()
        if self.principal is not None and self.principal.role == "customer":
            bought = set(await self.ctx.deps["orders"].purchased(self.principal.sub))
        if raw is not None:
            isbn = normalize_isbn(raw)
            book = await catalog.book(isbn)
            if book is None:
                raise errors.NotFound("no such book", code="book_not_found")
            categories, exclude = [book["category"]], bought | {isbn}
        elif self.principal is not None and self.principal.role == "customer":
            books = await catalog.books(sorted(bought)) if bought else {}
            categories = sorted({b["category"] for b in books.values()}) or []
            exclude = bought
        else:
            raise errors.InvalidInput("isbn: required unless signed in as a customer", code="invalid_field",
                                      details={"field": "isbn"})
        picks: list[dict] = []
        for category in categories:
            for book in await self.category_books(category):
                if book["isbn"] not in exclude and len(picks) < LIMIT:
                    fields = ("isbn", "title", "authors", "category", "price_cents", "currency")
                    picks.append({k: book[k] for k in fields})
        self.write_json({"items": picks})


def routes() -> list[tuple]:
    return [(r"/api/v1/recommendations", RecommendationsHandler)]

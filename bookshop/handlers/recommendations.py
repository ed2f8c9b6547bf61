"""Recommendations service: what to read next.

For now: books of the same category as the given one, newest first, never the book itself and never one
the signed-in customer already bought. Signed in without ``isbn``: books from the categories they bought.
"""
from __future__ import annotations

from bookshop.handlers.base import BaseHandler
from bookshop.services import errors
from bookshop.services.isbn import normalize_isbn

LIMIT = 5


class RecommendationsHandler(BaseHandler):
    public = {"GET"}

    async def category_books(self, category: str, skip: int) -> list[dict]:
        """The newest books of a category, enough of them to still have LIMIT after ``skip`` exclusions.

        Asked of the catalog each time (an indexed read of a few books), not cached here: a cached list
        would keep recommending a deleted or moved book; the gateway caches pages and drops them on events.
        """
        return await self.ctx.deps["catalog"].newest(category, min(100, LIMIT + skip))

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
            if len(picks) >= LIMIT:
                break
            for book in await self.category_books(category, len(exclude)):
                if book["isbn"] not in exclude and len(picks) < LIMIT:
                    fields = ("isbn", "title", "authors", "category", "price_cents", "currency")
                    picks.append({k: book[k] for k in fields})
        self.write_json({"items": picks})


def routes() -> list[tuple]:
    return [(r"/api/v1/recommendations", RecommendationsHandler)]

"""Catalog service routes: books, search, and the internal bulk lookup the orders service prices with."""
from __future__ import annotations

import logging

from bookshop.deps import CatalogDeps
from bookshop.handlers.base import BaseHandler
from bookshop.services import catalog, errors
from bookshop.services.isbn import normalize_isbn
from bookshop.services.views import book_view
from bookshop.validation import StrictModel

log = logging.getLogger(__name__)


class CatalogBase(BaseHandler):
    """Base of the catalog routes: their collaborators are ``self.deps``."""
    deps: CatalogDeps


class NewBook(StrictModel):
    isbn: str
    title: str
    authors: list[str]
    category: str
    price_cents: int
    currency: str
    description: str | None = None
    published_year: int | None = None


class BookPatch(StrictModel):
    title: str | None = None
    authors: list[str] | None = None
    category: str | None = None
    price_cents: int | None = None
    currency: str | None = None
    description: str | None = None
    published_year: int | None = None


class BooksHandler(CatalogBase):
    public = {"GET"}

    async def get(self):
        arg = self.get_query_argument
        docs, next_cursor = await self.deps.search_books(arg("q", ""), arg("author", ""), arg("category", ""),
                                                         catalog.page_limit(arg("limit", None)), arg("cursor", None))
        self.write_json({"items": [book_view(d) for d in docs], "next_cursor": next_cursor})

    async def post(self):
        self.require("staff")
        body = self.json_body(NewBook)
        isbn = normalize_isbn(body.isbn)
        fields = catalog.check_book_fields(body.model_dump(exclude={"isbn"}), self.ctx.settings.currency)
        book = {"isbn": isbn, **fields}
        doc = await self.deps.books.add({**book, **catalog.search_words(book)})
        if doc is None:
            raise errors.Conflict(f"a book with ISBN {isbn} exists", code="isbn_exists")
        log.info("book %s created", isbn)
        self.write_json(book_view(doc), 201)


class BookHandler(CatalogBase):
    public = {"GET"}

    async def get(self, raw_isbn):
        doc = await self.deps.books.get(normalize_isbn(raw_isbn))
        if doc is None:
            raise errors.NotFound("no such book", code="book_not_found")
        self.write_json(book_view(doc))

    async def patch(self, raw_isbn):
        self.require("staff")
        isbn = normalize_isbn(raw_isbn)
        body = self.json_body(BookPatch)
        changes = body.model_dump(exclude_unset=True)
        for field in ("title", "authors", "category", "price_cents", "currency"):
            if field in changes and changes[field] is None:
                raise errors.InvalidInput(f"{field}: may not be null", code="invalid_field",
                                          details={"field": field})
        if not changes:
            raise errors.InvalidInput("body: nothing to change", code="invalid_field", details={"field": "body"})
        doc = await self.deps.edit_book(isbn, catalog.check_book_fields(changes, self.ctx.settings.currency))
        self.write_json(book_view(doc))

    async def delete(self, raw_isbn):
        self.require("staff")
        isbn = normalize_isbn(raw_isbn)
        if not await self.deps.books.delete(isbn):
            raise errors.NotFound("no such book", code="book_not_found")
        log.info("book %s deleted", isbn)
        self.set_status(204)
        self.finish()


class InternalBooksHandler(CatalogBase):
    """``GET /internal/books?isbns=a,b``: books on sale among those ISBNs (service token)."""

    async def get(self):
        self.require("service")
        raw = [s for s in self.get_query_argument("isbns", "").split(",") if s]
        if not 1 <= len(raw) <= 200:
            raise errors.InvalidInput("isbns: give 1 to 200 ISBNs", code="invalid_field",
                                      details={"field": "isbns"})
        isbns = [normalize_isbn(s, "isbns") for s in raw]
        docs = await self.deps.books.get_many(isbns)
        self.write_json({"items": [book_view(d) for d in docs]})


class InternalNewestHandler(CatalogBase):
    """``GET /internal/books/newest?category=&limit=N``: books on sale in a category, newest first (service
    token). Recommendations read it on every call: an index walk of ``limit`` books, so nothing needs caching."""

    async def get(self):
        self.require("service")
        category = self.get_query_argument("category", "").strip().lower()
        if not 1 <= len(category) <= 50:
            raise errors.InvalidInput("category: 1 to 50 characters", code="invalid_field",
                                      details={"field": "category"})
        limit = catalog.page_limit(self.get_query_argument("limit", None))
        docs = await self.deps.books.newest(category, limit)
        self.write_json({"items": [book_view(d) for d in docs]})


ISBN = r"([^/]{1,64})"


def routes() -> list[tuple]:
    return [
        (r"/api/v1/books", BooksHandler),
        (rf"/api/v1/books/{ISBN}", BookHandler),
        (r"/internal/books", InternalBooksHandler),
        (r"/internal/books/newest", InternalNewestHandler),
    ]

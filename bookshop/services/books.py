"""Use cases of the catalogue that take more than one step of the repository."""
from __future__ import annotations

from typing import Protocol

from bookshop.services import catalog, errors


class BookStore(Protocol):
    async def get(self, isbn: str) -> dict | None: ...

    async def update(self, isbn: str, changes: dict, expect: dict | None) -> dict | None: ...


class SearchStore(Protocol):
    async def search(self, q_words: list[str], author_words: list[str], category: str | None, after: str | None,
                     limit: int) -> list[dict]: ...


def book_not_found() -> errors.NotFound:
    return errors.NotFound("no such book", code="book_not_found")


class EditBook:
    """Change some fields of a book (already checked by ``catalog.check_book_fields``).

    The search words come from title and authors, so a change of either is written only if neither changed
    since it was read: a concurrent edit of the other one would otherwise leave words that match neither.
    A lost race is read again and retried, ``attempts`` times in all, then answered ``Conflict``."""

    def __init__(self, books: BookStore, attempts: int = 5):
        self.books = books
        self.attempts = attempts

    async def __call__(self, isbn: str, changes: dict) -> dict:
        if "title" not in changes and "authors" not in changes:
            doc = await self.books.update(isbn, changes, None)
            if doc is None:
                raise book_not_found()
            return doc
        for _ in range(self.attempts):
            current = await self.books.get(isbn)
            if current is None:
                raise book_not_found()
            expect = {"title": current["title"], "authors": current["authors"]}
            words = catalog.search_words({"title": changes.get("title", current["title"]),
                                          "authors": changes.get("authors", current["authors"])})
            doc = await self.books.update(isbn, {**changes, **words}, expect)
            if doc is not None:
                return doc
        raise errors.Conflict("the book is being edited by someone else; try again", code="edit_conflict")


class SearchBooks:
    """``GET /books``: books on sale by words of the title or description, of the authors, and a category,
    a page at a time in ISBN order, behind opaque cursors signed by this server."""

    def __init__(self, books: SearchStore, cursors: catalog.CursorCodec):
        self.books = books
        self.cursors = cursors

    async def __call__(self, q: str, author: str, category: str, limit: int,
                       cursor: str | None) -> tuple[list[dict], str | None]:
        category = category.strip().lower() or None
        if len(q) > 200 or len(author) > 200 or (category and len(category) > 50):
            raise errors.InvalidInput("search terms are too long", code="invalid_field")
        after = None
        if cursor:
            after = self.cursors.decode(cursor).get("after")
            if not isinstance(after, str):
                raise errors.InvalidInput("cursor: not a cursor this server issued", code="invalid_field")
        q_words, author_words = catalog.words(q)[:8], catalog.words(author)[:8]
        if (q.strip() and not q_words) or (author.strip() and not author_words):
            return [], None  # only punctuation: nothing can match
        docs = await self.books.search(q_words, author_words, category, after, limit + 1)
        more = len(docs) > limit
        docs = docs[:limit]
        return docs, (self.cursors.encode({"after": docs[-1]["_id"]}) if more else None)

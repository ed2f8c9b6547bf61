"""Use cases of the catalogue that take more than one step of the repository."""
from __future__ import annotations

from typing import Protocol

from bookshop.services import catalog, errors


class BookStore(Protocol):
    async def get(self, isbn: str) -> dict | None: ...
    async def update(self, isbn: str, changes: dict, expect: dict | None) -> dict | None: ...


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

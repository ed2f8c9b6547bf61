"""The catalog's books collection, with the indexes its searches use."""
from __future__ import annotations

import pymongo

from bookshop.services.views import book_view
from bookshop.storage.mongo import DuplicateKeyError
from bookshop.storage.outbox import EventLog, new_event, utcnow

NEWEST = [("category", 1), ("published_year", -1), ("_id", 1)]


class BookRepo:
    """Books keyed by ISBN-13. Deleted books stay as tombstones (``deleted_at``) so ISBNs keep meaning."""

    def __init__(self, database, events: EventLog):
        self.database = database
        self.books = database["books"]
        self.events = events

    async def create_indexes(self) -> None:
        await self.books.create_index([("words", 1), ("_id", 1)])
        await self.books.create_index([("author_words", 1), ("_id", 1)])
        await self.books.create_index([("category", 1), ("_id", 1)])
        await self.books.create_index(NEWEST)

    async def get(self, isbn: str) -> dict | None:
        return await self.books.find_one({"_id": isbn, "deleted_at": None})

    async def get_many(self, isbns: list[str]) -> list[dict]:
        return await self.books.find({"_id": {"$in": isbns}, "deleted_at": None}).to_list(None)

    async def add(self, book: dict) -> dict | None:
        """Insert a book with its ``book.created`` event; None if the ISBN is on sale already."""
        now = utcnow()
        doc = {"_id": book["isbn"], **book, "created_at": now, "updated_at": now, "deleted_at": None}

        async def work(session):
            existing = await self.books.find_one({"_id": doc["_id"]}, {"deleted_at": 1}, session=session)
            if existing is not None and existing.get("deleted_at") is None:
                return None
            await self.books.replace_one({"_id": doc["_id"]}, doc, upsert=True, session=session)
            await self.events.record(new_event("book.created", book_view(doc)), session=session)
            return doc

        try:
            return await self.database.transaction(work)
        except DuplicateKeyError:
            return None

    async def update(self, isbn: str, changes: dict, expect: dict | None = None) -> dict | None:
        """Apply ``changes`` (with a ``book.updated`` event) if the book is on sale and still has the
        ``expect`` values; None otherwise."""
        async def work(session):
            doc = await self.books.find_one_and_update(
                {"_id": isbn, "deleted_at": None, **(expect or {})}, {"$set": {**changes, "updated_at": utcnow()}},
                return_document=pymongo.ReturnDocument.AFTER, session=session)
            if doc is not None:
                await self.events.record(new_event("book.updated", book_view(doc)), session=session)
            return doc
        return await self.database.transaction(work)

    async def delete(self, isbn: str) -> bool:
        async def work(session):
            doc = await self.books.find_one_and_update(
                {"_id": isbn, "deleted_at": None}, {"$set": {"deleted_at": utcnow()}}, session=session)
            if doc is not None:
                await self.events.record(new_event("book.deleted", {"isbn": isbn, "title": doc["title"]}),
                                         session=session)
            return doc is not None
        return await self.database.transaction(work)

    def _query(self, q_words: list[str], author_words: list[str], category: str | None, after: str | None):
        query: dict = {"deleted_at": None}
        hint = "_id_"
        if q_words:
            query["words"] = {"$all": q_words} if len(q_words) > 1 else q_words[0]
            hint = [("words", 1), ("_id", 1)]
        if author_words:
            query["author_words"] = {"$all": author_words} if len(author_words) > 1 else author_words[0]
            if not q_words:
                hint = [("author_words", 1), ("_id", 1)]
        if category:
            query["category"] = category
            if not q_words and not author_words:
                hint = [("category", 1), ("_id", 1)]
        if after is not None:
            query["_id"] = {"$gt": after}
        return query, hint

    async def search(self, q_words, author_words, category, after, limit) -> list[dict]:
        query, hint = self._query(q_words, author_words, category, after)
        cursor = self.books.find(query).sort("_id", 1).hint(hint).limit(limit)
        return await cursor.to_list(limit)

    def _newest(self, category: str, limit: int):
        return self.books.find({"category": category, "deleted_at": None}).sort(NEWEST[1:]).hint(NEWEST).limit(limit)

    async def newest(self, category: str, limit: int) -> list[dict]:
        """Books on sale in a category, newest first (by year, undated ones last, then by ISBN)."""
        return await self._newest(category, limit).to_list(limit)

    async def explain_newest(self, category: str, limit: int) -> dict:
        return await self._newest(category, limit).explain()

    async def explain_search(self, q_words, author_words, category, after, limit) -> dict:
        query, hint = self._query(q_words, author_words, category, after)
        return await self.books.find(query).sort("_id", 1).hint(hint).limit(limit).explain()

    async def seed(self, books: list[dict]) -> int:
        """Insert the demo catalogue into an empty shop (with events), once even with several instances."""
        if await self.books.estimated_document_count() > 0:
            return 0
        now = utcnow()
        docs = [{"_id": b["isbn"], **b, "created_at": now, "updated_at": now, "deleted_at": None} for b in books]

        async def work(session):
            await self.books.insert_many(docs, session=session)
            await self.events.outbox.insert_many([new_event("book.created", book_view(d)) for d in docs],
                                                 session=session)
            return len(docs)
        try:
            return await self.database.transaction(work)
        except DuplicateKeyError:
            return 0

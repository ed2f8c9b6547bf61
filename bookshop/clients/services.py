"""The upstream clients, one class per sibling service."""
from __future__ import annotations

import cachetools

from bookshop.clients.base import Reply, UpstreamClient
from bookshop.services import errors


class UsersClient(UpstreamClient):
    service = "users"

    async def jwks(self) -> dict:
        reply = await self.request("GET", "/.well-known/jwks.json", service_auth=False)
        if not reply.ok or not isinstance(reply.body, dict):
            raise errors.Unavailable("users service gave no keys", retry_after=2)
        return reply.body


class CatalogClient(UpstreamClient):
    service = "catalog"

    async def book(self, isbn: str) -> dict | None:
        reply = await self.request("GET", f"/api/v1/books/{isbn}", service_auth=False)
        if reply.status == 404:
            return None
        self.raise_for(reply)
        return reply.body

    async def books(self, isbns: list[str]) -> dict[str, dict]:
        """Books on sale among ``isbns``, by ISBN (missing ones are deleted or unknown)."""
        out: dict[str, dict] = {}
        for i in range(0, len(isbns), 200):
            chunk = isbns[i:i + 200]
            reply = await self.request("GET", "/internal/books", params={"isbns": ",".join(chunk)})
            self.raise_for(reply)
            out.update({b["isbn"]: b for b in reply.body["items"]})
        return out

    async def newest(self, category: str, limit: int) -> list[dict]:
        """Books on sale in ``category``, newest first."""
        reply = await self.request("GET", "/internal/books/newest",
                                   params={"category": category, "limit": str(limit)})
        self.raise_for(reply)
        return reply.body["items"]

    async def search(self, params: dict) -> dict:
        reply = await self.request("GET", "/api/v1/books", params=params, service_auth=False)
        self.raise_for(reply)
        return reply.body


class InventoryClient(UpstreamClient):
    """Stock levels and the reservations of orders. It remembers which ISBNs it reserved for the last
    ``REMEMBERED`` orders and names them when it commits, releases or puts back one of them, so the inventory
    reads just those level documents (it finds them without, at more cost)."""

    service = "inventory"
    REMEMBERED = 10_000

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._isbns: cachetools.LRUCache[str, list[str]] = cachetools.LRUCache(maxsize=self.REMEMBERED)

    def _remember(self, order_id: str, items: list[dict]) -> None:
        self._isbns[order_id] = sorted({item["isbn"] for item in items})

    async def levels(self, isbn: str) -> dict | None:
        reply = await self.request("GET", f"/api/v1/inventory/{isbn}", service_auth=False)
        if reply.status == 404:
            return None
        self.raise_for(reply)
        return reply.body

    async def reserve(self, order_id: str, items: list[dict]) -> dict:
        # idempotent per order id, so safe to retry
        self._remember(order_id, items)
        reply = await self.request("POST", "/internal/reservations",
                                   json_body={"order_id": order_id, "items": items}, idempotent=True)
        self.raise_for(reply)
        return reply.body

    async def _end(self, order_id: str, action: str) -> dict:
        isbns = self._isbns.get(order_id)
        reply = await self.request("POST", f"/internal/reservations/{order_id}/{action}", idempotent=True,
                                   json_body={"isbns": isbns} if isbns else None)
        if reply.status == 404:
            return {"order_id": order_id, "state": "none"}
        self.raise_for(reply)
        return reply.body

    async def commit(self, order_id: str) -> dict:
        return await self._end(order_id, "commit")

    async def release(self, order_id: str) -> dict:
        return await self._end(order_id, "release")

    async def put_back(self, order_id: str) -> dict:
        return await self._end(order_id, "put-back")


class PaymentsClient(UpstreamClient):
    service = "payments"

    async def charge(self, order_id: str, amount_cents: int, currency: str, card: dict) -> dict:
        """Charge once per order (the payments service dedupes by order id, so a retry is safe)."""
        reply = await self.request("POST", "/internal/charges", idempotent=True, json_body={
            "order_id": order_id, "amount_cents": amount_cents, "currency": currency, "card": card})
        if reply.status in (200, 201, 402):
            return reply.body
        self.raise_for(reply)
        return reply.body

    async def refund(self, order_id: str) -> dict:
        reply = await self.request("POST", f"/internal/charges/{order_id}/refund", idempotent=True)
        self.raise_for(reply)
        return reply.body

    async def status(self, order_id: str) -> dict | None:
        """The order's charge (status, refunded, ledger), or None if it was never charged."""
        reply = await self.request("GET", f"/internal/charges/{order_id}")
        if reply.status == 404:
            return None
        self.raise_for(reply)
        return reply.body

    async def ledger(self, order_id: str) -> list[dict]:
        reply = await self.request("GET", f"/internal/charges/{order_id}")
        if reply.status == 404:
            return []
        self.raise_for(reply)
        return reply.body["ledger"]


class OrdersClient(UpstreamClient):
    service = "orders"

    async def recent(self, user_id: str | None, limit: int = 50) -> list[dict]:
        params = {"limit": str(limit)}
        if user_id:
            params["user_id"] = user_id
        reply = await self.request("GET", "/internal/orders/recent", params=params)
        self.raise_for(reply)
        return reply.body["items"]

    async def purchases(self, after: str | None, limit: int = 500) -> tuple[list[dict], str | None]:
        """One page of confirmed and shipped orders ``{id, user_id, status, lines}`` by id, after the order
        ``after``; and the id to ask after next (None: that was the last page)."""
        params = {"limit": str(limit), **({"after": after} if after else {})}
        reply = await self.request("GET", "/internal/orders/purchases", params=params)
        self.raise_for(reply)
        return reply.body["items"], reply.body["next_after"]


class RecommendationsClient(UpstreamClient):
    service = "recommendations"

    async def for_book(self, isbn: str, token: str | None = None) -> list[dict] | None:
        reply = await self.request("GET", "/api/v1/recommendations", params={"isbn": isbn},
                                   token=token, service_auth=False)
        if reply.status == 404:
            return None
        self.raise_for(reply)
        return reply.body["items"]


class StreamSource:
    """What the gateway needs to follow a service's event stream."""

    def __init__(self, client: UpstreamClient):
        self.client = client

    async def read(self, after: int, limit: int = 500) -> dict:
        reply: Reply = await self.client.request("GET", "/internal/events",
                                                 params={"after": str(after), "limit": str(limit)})
        self.client.raise_for(reply)
        return reply.body

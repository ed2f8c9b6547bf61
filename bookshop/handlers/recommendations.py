"""Recommendations service: what to read next (the rules are in ``services.recommendations``).

``GET /api/v1/recommendations?isbn=X``: for a reader of X; signed in as a customer without ``isbn``: from
what they bought. Each answer says, in ``X-Orders-Seq``, how far into the orders stream the counts it was
made from had got (a cache can tell an answer made before an order it has seen an event of).
"""
from __future__ import annotations

from bookshop.deps import RecommendationsDeps
from bookshop.handlers.base import BaseHandler
from bookshop.services.isbn import normalize_isbn


class RecommendationsBase(BaseHandler):
    """Base of the recommendations routes: their collaborators are ``self.deps``."""
    deps: RecommendationsDeps


class RecommendationsHandler(RecommendationsBase):
    public = {"GET"}

    async def get(self):
        raw = self.get_query_argument("isbn", None)
        customer = self.principal.sub if self.principal is not None and self.principal.role == "customer" else None
        items, seq = await self.deps.recommend(normalize_isbn(raw) if raw is not None else None, customer)
        self.set_header("X-Orders-Seq", str(seq))
        self.write_json({"items": items})


def routes() -> list[tuple]:
    return [(r"/api/v1/recommendations", RecommendationsHandler)]

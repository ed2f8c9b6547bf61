"""Payments service routes: a simulated card processor, behind service tokens only.

Fault injection for tests and demos: ``BOOKSHOP_PAYMENTS_LATENCY_MS`` delays every charge and
``BOOKSHOP_PAYMENTS_FAILURE_RATE`` answers that share of charges with a 503 (before anything is stored).
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import random

from bookshop.deps import PaymentsDeps
from bookshop.handlers.base import BaseHandler
from bookshop.handlers.bodies import Card
from bookshop.services import cards, errors
from bookshop.services.views import charge_view
from bookshop.validation import StrictModel

log = logging.getLogger(__name__)


class PaymentsBase(BaseHandler):
    """Base of the payments routes: their collaborators are ``self.deps``."""
    deps: PaymentsDeps


class ChargeRequest(StrictModel):
    order_id: str
    amount_cents: int
    currency: str
    card: Card


class ChargesHandler(PaymentsBase):
    async def post(self):
        self.require("service")
        body = self.json_body(ChargeRequest)
        settings = self.ctx.settings
        if settings.payments_latency_ms:
            await asyncio.sleep(settings.payments_latency_ms / 1000)
        if settings.payments_failure_rate and random.random() < settings.payments_failure_rate:
            raise errors.Unavailable("card processor unavailable (injected fault)", retry_after=1)
        card = body.card
        number = cards.validate_card(card.card_number, card.exp_month, card.exp_year, card.cvc,
                                     datetime.date.today())
        if not 0 < body.amount_cents <= cards.MAX_CHARGE_CENTS or body.currency != settings.currency:
            raise errors.InvalidInput("amount_cents/currency: invalid amount", code="invalid_field",
                                      details={"field": "amount_cents"})
        decision = cards.card_decision(number)
        status = "charged" if decision == cards.APPROVED else "declined"
        repo = self.deps.charges
        doc, created = await repo.record(body.order_id, body.amount_cents, body.currency,
                                         cards.last4(number), status,
                                         None if status == "charged" else decision)
        if doc["status"] == "voided":
            raise errors.Conflict("this order's payment was voided", code="charge_voided")
        if created:
            self.ctx.metrics.count(f"charges_{status}")
            log.info("order %s: %s %d %s (card ending %s)", body.order_id, status, body.amount_cents,
                     body.currency, doc["last4"])
        self.write_json(charge_view(doc), 201 if created else 200)


class ChargeHandler(PaymentsBase):
    async def get(self, order_id):
        self.require("service")
        doc = await self.deps.charges.get(order_id)
        if doc is None:
            raise errors.NotFound("no charge for this order", code="charge_not_found")
        self.write_json(charge_view(doc))


class RefundHandler(PaymentsBase):
    async def post(self, order_id):
        self.require("service")
        doc, refunded = await self.deps.refund_payment(order_id)
        if refunded:
            self.ctx.metrics.count("refunds")
            log.info("order %s refunded", order_id)
        self.write_json(charge_view(doc))


def routes() -> list[tuple]:
    return [
        (r"/internal/charges", ChargesHandler),
        (r"/internal/charges/([A-Za-z0-9_-]{1,64})", ChargeHandler),
        (r"/internal/charges/([A-Za-z0-9_-]{1,64})/refund", RefundHandler),
    ]

"""Request-body parts more than one service reads: an order line and a payment card (strict, see
``bookshop.validation``)."""
from __future__ import annotations

from bookshop.validation import StrictModel


class Line(StrictModel):
    isbn: str
    quantity: int


class Card(StrictModel):
    card_number: str
    exp_month: int
    exp_year: int
    cvc: str

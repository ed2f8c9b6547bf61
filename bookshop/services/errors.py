"""Domain errors. Handlers map them to HTTP statuses in one place (bookshop.handlers.base)."""
from __future__ import annotations


class DomainError(Exception):
    """Base of every error the shop reports to a client."""

    code = "error"
    message = "request failed"

    def __init__(self, message: str | None = None, *, code: str | None = None,
                 details: dict | None = None, retry_after: int | None = None):
        super().__init__(message or self.message)
        self.message = message or self.message
        if code:
            self.code = code
        self.details = details
        self.retry_after = retry_after


class InvalidInput(DomainError):
    code = "invalid_input"
    message = "invalid input"


class Unauthenticated(DomainError):
    code = "unauthenticated"
    message = "a valid bearer token is required"


class Forbidden(DomainError):
    code = "forbidden"
    message = "not allowed"


class NotFound(DomainError):
    code = "not_found"
    message = "not found"


class Conflict(DomainError):
    code = "conflict"
    message = "conflict"


class OutOfStock(Conflict):
    code = "out_of_stock"
    message = "not enough stock"


class PaymentDeclined(DomainError):
    code = "payment_declined"
    message = "the card was declined"


class IdempotencyMismatch(DomainError):
    code = "idempotency_key_reused"
    message = "this Idempotency-Key was used with another request body"


class PayloadTooLarge(DomainError):
    code = "payload_too_large"
    message = "request body too large (limit 1 MiB)"


class RateLimited(DomainError):
    code = "rate_limited"
    message = "too many requests"


class Unavailable(DomainError):
    """An upstream service or the database cannot serve now; the client may retry."""
    code = "service_unavailable"
    message = "a service the request needs is unavailable"


class UpstreamError(Unavailable):
    """An upstream answered with something unexpected (a 5xx or garbage)."""
    code = "upstream_error"
    message = "an upstream service failed"

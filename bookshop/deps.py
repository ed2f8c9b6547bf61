"""What each service's handlers work with: one frozen dataclass of collaborators per service.

``bookshop/wiring.py`` builds one per service (the only place that does) and ``make_app`` hands it to every
handler of that service through ``initialize(deps=...)``. A handler reads ``self.deps.books``, and a reader's
go-to-definition lands here, then on the collaborator's own class. The classes are named under
``TYPE_CHECKING`` only: at run time this module imports nothing of the layers it names, so a handler that
imports it does not import storage.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - names for readers and type checkers
    from bookshop.clients.cache import BookPageCache
    from bookshop.clients.services import (CatalogClient, InventoryClient, OrdersClient, PaymentsClient,
                                           RecommendationsClient, UsersClient)
    from bookshop.services.accounts import TokenIssuer
    from bookshop.services.books import EditBook, SearchBooks
    from bookshop.services.catalog import CursorCodec
    from bookshop.services.checkout import Checkout
    from bookshop.services.inventory import Reservations
    from bookshop.services.logins import ChangePassword, Login, Refresh, Register
    from bookshop.services.payments import RefundPayment
    from bookshop.services.place_order import PlaceOrders
    from bookshop.services.recommendations import Learner, Recommend
    from bookshop.services.stats import TodaysTotals
    from bookshop.storage.catalog import BookRepo
    from bookshop.storage.inventory import LevelRepo
    from bookshop.storage.orders import CartRepo, OrderRepo
    from bookshop.storage.payments import ChargeRepo
    from bookshop.storage.users import KeyRepo, RefreshTokenRepo, UserRepo
    from bookshop.ws.hub import Hub, Waiters
    from bookshop.handlers.live import LiveSocket

frozen = dataclasses.dataclass(frozen=True, slots=True)


@frozen
class UsersDeps:
    users: UserRepo
    refresh_tokens: RefreshTokenRepo
    keys: KeyRepo
    issuer: TokenIssuer
    register: Register
    login: Login
    change_password: ChangePassword
    refresh: Refresh


@frozen
class CatalogDeps:
    books: BookRepo
    search_books: SearchBooks
    edit_book: EditBook


@frozen
class InventoryDeps:
    levels: LevelRepo
    reservations: Reservations
    catalog: CatalogClient


@frozen
class OrdersDeps:
    orders: OrderRepo
    carts: CartRepo
    checkout: Checkout
    place_orders: PlaceOrders
    totals: TodaysTotals  # GET /orders/summary (bookshop/handlers/stats.py)
    cursors: CursorCodec
    catalog: CatalogClient
    inventory: InventoryClient
    payments: PaymentsClient


@frozen
class PaymentsDeps:
    charges: ChargeRepo
    refund_payment: RefundPayment


@frozen
class RecommendationsDeps:
    learner: Learner
    recommend: Recommend


@frozen
class Upstreams:
    """The gateway's clients of the services it forwards the public API to."""
    users: UsersClient
    catalog: CatalogClient
    inventory: InventoryClient
    orders: OrdersClient
    recommendations: RecommendationsClient

    def owner(self, service: str) -> UsersClient | CatalogClient | InventoryClient | OrdersClient \
            | RecommendationsClient:
        """The client of ``service``, a name from the gateway's route table (its "owner" column)."""
        if service not in UPSTREAMS:
            raise KeyError(service)
        return getattr(self, service)


UPSTREAMS = tuple(f.name for f in dataclasses.fields(Upstreams))


@frozen
class GatewayDeps:
    upstreams: Upstreams
    hub: Hub
    cache: BookPageCache
    waiters: Waiters
    sockets: set[LiveSocket]  # the open browser sockets, closed with 1001 on shutdown

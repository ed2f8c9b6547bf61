"""Wiring: for each service, its repositories, domain services, clients, background tasks and routes.

This is the one place that knows how the parts fit. Each builder returns the service's collaborators, one
frozen dataclass of ``bookshop/deps.py``, and its routes; ``make_app`` hands the dataclass to every handler
through ``initialize()``.
"""
from __future__ import annotations

import asyncio
import datetime
import logging

from bookshop import tracing
from bookshop.auth import TokenVerifier
from bookshop.clients import services as clients
from bookshop.context import ServiceContext, make_app
from bookshop.deps import (CatalogDeps, GatewayDeps, InventoryDeps, OrdersDeps, PaymentsDeps, RecommendationsDeps,
                           Upstreams, UsersDeps)
from bookshop.services.periodic import every
from bookshop.settings import Settings, SettingsError

log = logging.getLogger(__name__)

STREAMS = ("catalog", "inventory", "orders")  # the services that keep an event stream


def _client(ctx: ServiceContext, cls, service: str, **kw):
    return cls(ctx.http, ctx.settings.url(service), ctx.tokens, timeout=ctx.settings.upstream_timeout, **kw)


async def _users(ctx: ServiceContext) -> tuple[UsersDeps, list]:
    from bookshop.handlers import users
    from bookshop.services import accounts, logins
    from bookshop.services.clock import utcnow
    from bookshop.storage.users import KeyRepo, LoginAttemptRepo, RefreshTokenRepo, UserRepo
    db, settings = ctx.db, ctx.settings
    users_repo, keys, refresh_tokens, attempts = UserRepo(db), KeyRepo(db), RefreshTokenRepo(db), LoginAttemptRepo(db)
    hashes = accounts.HashPool()
    issuer = accounts.TokenIssuer(keys, refresh_tokens, settings.access_token_ttl, utcnow)
    lockout = logins.LockoutPolicy(attempts, hashes, settings.login_max_failures, settings.login_lock_seconds,
                                   ctx.metrics)
    registrations = accounts.RegistrationLimit(settings.registration_limit)
    deps = UsersDeps(users=users_repo, refresh_tokens=refresh_tokens, keys=keys, issuer=issuer,
                     register=logins.Register(users_repo, hashes, registrations, ctx.metrics),
                     login=logins.Login(users_repo, lockout, issuer),
                     change_password=logins.ChangePassword(users_repo, refresh_tokens, lockout),
                     refresh=logins.Refresh(refresh_tokens, users_repo, issuer, utcnow))
    for repo in (users_repo, refresh_tokens, attempts):
        await repo.create_indexes()
    if await keys.active() is None:
        key = await asyncio.to_thread(accounts.new_signing_key)
        await keys.add_first(key)

    async def local_jwks():
        return {"keys": await keys.published()}
    ctx.verifier = TokenVerifier(local_jwks)

    async def close_hashes():
        hashes.close()
    ctx.on_shutdown.append(close_hashes)
    if settings.admin_email:
        email = accounts.normalize_email(settings.admin_email)
        existing = await deps.users.by_email(email)
        if existing is None or existing["role"] != "staff" or not accounts.verify_password(
                existing["password_hash"], settings.admin_password):
            hashed = accounts.hash_password(settings.admin_password)
            user_id = await deps.users.ensure_staff(email, "Shop staff", hashed)
            # a change of role or password: logins made before it (perhaps by whoever registered the email
            # first) must not refresh into staff tokens
            await refresh_tokens.revoke_user(user_id)
            log.info("staff account ensured for the configured admin email; its earlier logins are revoked")
    return deps, users.routes()


async def _catalog(ctx: ServiceContext) -> tuple[CatalogDeps, list]:
    from bookshop.handlers import catalog
    from bookshop.services import demo_data
    from bookshop.services.books import EditBook, SearchBooks
    from bookshop.services.catalog import CursorCodec, search_words
    from bookshop.storage.catalog import BookRepo
    if not ctx.settings.service_secret:
        raise SettingsError("BOOKSHOP_SERVICE_SECRET is not set: catalog signs its paging cursors with it")
    ctx.use_remote_keys()
    ctx.use_event_log()
    await ctx.event_log.create_indexes()
    books = BookRepo(ctx.db, ctx.event_log)
    await books.create_indexes()
    if ctx.settings.demo_data:
        seeded = await books.seed([{**b, **search_words(b), "currency": ctx.settings.currency}
                                   for b in demo_data.demo_books()])
        if seeded:
            log.info("seeded the demo catalogue (%d books)", seeded)
    deps = CatalogDeps(books=books, search_books=SearchBooks(books, CursorCodec(ctx.settings.service_secret)),
                       edit_book=EditBook(books))
    return deps, catalog.routes()


async def _inventory(ctx: ServiceContext) -> tuple[InventoryDeps, list]:
    from bookshop.handlers import inventory
    from bookshop.services import demo_data
    from bookshop.services.inventory import Reservations
    from bookshop.storage.inventory import LegacyReservationRepo, LevelRepo
    from bookshop.storage.outbox import utcnow
    ctx.use_remote_keys()
    ctx.use_event_log()
    levels = LevelRepo(ctx.db, ctx.event_log)  # its writes wake the relay
    await ctx.event_log.create_indexes()
    await levels.create_indexes()
    ttl = ctx.settings.reservation_ttl
    reservations = Reservations(levels, levels.archive, ttl, utcnow)
    converted = await reservations.convert_legacy(LegacyReservationRepo(ctx.db))
    if converted:
        log.info("converted %d reservations of the earlier storage shape", converted)
    deps = InventoryDeps(levels=levels, reservations=reservations,
                         catalog=_client(ctx, clients.CatalogClient, "catalog"))
    if ctx.settings.demo_data:
        seeded = await levels.seed(demo_data.demo_stock_levels(demo_data.demo_books()))
        if seeded:
            log.info("seeded demo stock for %d books", seeded)
    # holds expire within a quarter of their time (at most 30 s late): one indexed read per pass
    ctx.spawn(every(ctx.stop, min(30.0, max(0.2, ttl / 4)), reservations.sweep, "reservation sweep"), "sweeper")
    return deps, inventory.routes()


async def _orders(ctx: ServiceContext) -> tuple[OrdersDeps, list]:
    from bookshop.handlers import orders, stats
    from bookshop.services.catalog import CursorCodec
    from bookshop.handlers.base import status_of
    from bookshop.services.checkout import Checkout
    from bookshop.services.place_order import PlaceOrders
    from bookshop.services.stats import TodaysTotals
    from bookshop.storage.order_stats import OrderStatsRepo
    from bookshop.storage.orders import CartRepo, OrderRepo
    from bookshop.storage.outbox import utcnow
    if not ctx.settings.service_secret:
        raise SettingsError("BOOKSHOP_SERVICE_SECRET is not set: orders signs its paging cursors and "
                            "idempotency fingerprints with it")
    ctx.use_remote_keys()
    ctx.use_event_log()
    # orders embed their pending events; the repository announces each write that adds one to the relay
    repo = OrderRepo(ctx.db, ctx.event_log)
    ctx.event_log.add_source(repo.pending_events)
    await ctx.event_log.create_indexes()
    await repo.create_indexes()
    await repo.convert_legacy()  # a data directory written by the version with idempotency records and transactions
    if ctx.settings.demo_data:
        # a made-up purchase history, so a first run's recommendations have something to say; written in the
        # background (a second or so on the embedded server), not in the start-up's 3 s
        async def seed_demo_history():
            from bookshop.services import demo_data
            seeded = await repo.seed_demo(demo_data.demo_orders(demo_data.demo_books(), utcnow().date(),
                                                                ctx.settings.currency))
            if seeded:
                log.info("seeded a demo purchase history (%d confirmed orders)", seeded)
        ctx.spawn(seed_demo_history(), "demo orders")
    catalog = _client(ctx, clients.CatalogClient, "catalog")
    # a breaker opened by a crash lets a trial call through each second: the sagas and recoveries waiting on
    # a restarted service go on within a second of its return, not a recovery timeout later
    inventory = _client(ctx, clients.InventoryClient, "inventory", recovery_timeout=1.0)
    payments = _client(ctx, clients.PaymentsClient, "payments", failure_threshold=3, recovery_timeout=1.0)
    checkout = Checkout(repo, catalog, inventory, payments, ctx.settings.currency, ctx.settings.saga_lease,
                        metrics=ctx.metrics, now=utcnow, concurrency=ctx.settings.checkout_concurrency,
                        recovery_trace=lambda order: tracing.linked_trace(
                            "recover order", order.get("traceparent"), {"order.id": order["_id"]}))
    carts = CartRepo(ctx.db)
    place_orders = PlaceOrders(checkout, repo, carts, ctx.settings.checkout_wait, status_of)
    # today's totals for the staff dashboard, in the shop's time zone
    order_stats = OrderStatsRepo(ctx.db)
    await order_stats.create_indexes()
    totals = TodaysTotals(order_stats, ctx.settings.zone, ctx.settings.currency, utcnow)
    deps = OrdersDeps(orders=repo, carts=carts, checkout=checkout, place_orders=place_orders, totals=totals,
                      cursors=CursorCodec(ctx.settings.service_secret), catalog=catalog, inventory=inventory,
                      payments=payments)
    # the recovery pass also sets the gauge saga_recovery_backlog (deploy/monitoring): no query of its own
    ctx.spawn(checkout.recover_forever(ctx.stop), "saga recovery")

    async def finish_sagas():
        if checkout.tasks:
            await asyncio.wait(list(checkout.tasks.values()), timeout=3.0)
    ctx.on_shutdown.insert(0, finish_sagas)
    return deps, stats.routes() + orders.routes()


async def _payments(ctx: ServiceContext) -> tuple[PaymentsDeps, list]:
    from bookshop.handlers import payments
    from bookshop.services.payments import RefundPayment
    from bookshop.storage.payments import ChargeRepo
    ctx.use_remote_keys()
    charges = ChargeRepo(ctx.db)
    return PaymentsDeps(charges=charges, refund_payment=RefundPayment(charges)), payments.routes()


async def _recommendations(ctx: ServiceContext) -> tuple[RecommendationsDeps, list]:
    from bookshop.clients.stream import EventStreamClient
    from bookshop.handlers import recommendations
    from bookshop.services.recommendations import Learner, Recommend, Recommender
    from bookshop.storage.recommendations import CoPurchaseRepo
    ctx.use_remote_keys()
    repo = CoPurchaseRepo(ctx.db)
    await repo.create_indexes()
    catalog = _client(ctx, clients.CatalogClient, "catalog")
    orders = _client(ctx, clients.OrdersClient, "orders")
    stream = EventStreamClient(ctx.http, ctx.settings.url("orders"), ctx.tokens)
    learner = Learner(repo, orders.purchases, stream.follow, metrics=ctx.metrics, owner=ctx.instance)
    ctx.spawn(learner.run(ctx.stop), "follow-orders")
    ctx.on_shutdown.append(learner.release)  # the next instance (or this one restarted) takes over at once
    recommend = Recommend(Recommender(catalog, repo), lambda: learner.state.last_seq)
    return RecommendationsDeps(learner=learner, recommend=recommend), recommendations.routes()


async def _gateway(ctx: ServiceContext) -> tuple[GatewayDeps, list]:
    from bookshop.clients.cache import BookPageCache
    from bookshop.clients.stream import EventStreamClient
    from bookshop.handlers import gateway
    from bookshop.ws.follower import StreamFollower
    from bookshop.ws.hub import Hub, Stream, Waiters
    ctx.use_remote_keys()
    upstreams = Upstreams(
        users=_client(ctx, clients.UsersClient, "users"),
        catalog=_client(ctx, clients.CatalogClient, "catalog"),
        inventory=_client(ctx, clients.InventoryClient, "inventory"),
        orders=_client(ctx, clients.OrdersClient, "orders"),
        recommendations=_client(ctx, clients.RecommendationsClient, "recommendations"),
    )
    part = min(1.0, ctx.settings.upstream_timeout)
    streams = {name: Stream(name, clients.StreamSource(upstreams.owner(name))) for name in STREAMS}

    async def snapshot(channel, sub, principal):
        # (seq, data, epoch): epoch None where the service does not say which history its seq is in (the hub
        # then takes the stream's)
        if channel == "inventory":
            reply = await upstreams.inventory.request("GET", "/internal/levels", params={"limit": "1000"})
            upstreams.inventory.raise_for(reply)
            return reply.body["seq"], {"items": reply.body["items"]}, reply.body.get("epoch")
        if channel == "books":
            head = await streams["catalog"].source.read(2**62, 1)
            page = await upstreams.catalog.search({"limit": "100"})
            return head["seq"], {"items": page["items"]}, head.get("epoch")
        reply = await upstreams.orders.request("GET", "/internal/orders/recent", params={
            "limit": "50", **({"user_id": sub.filter.user_id} if sub.filter.user_id else {})})
        upstreams.orders.raise_for(reply)
        return reply.body["seq"], {"items": reply.body["items"]}, reply.body.get("epoch")

    hub = Hub(streams, snapshot, ctx.metrics, max_per_address=ctx.settings.ws_max_per_address)
    cache = BookPageCache(hub, upstreams.catalog,
                          clients.InventoryClient(ctx.http, ctx.settings.url("inventory"), ctx.tokens, timeout=part,
                                                  retries=0),
                          clients.RecommendationsClient(ctx.http, ctx.settings.url("recommendations"), ctx.tokens,
                                                        timeout=part, retries=0))
    waiters = Waiters()
    hub.listeners.append(waiters.on_event)
    sockets: set = set()
    deps = GatewayDeps(upstreams=upstreams, hub=hub, cache=cache, waiters=waiters, sockets=sockets)
    for name in streams:
        follower = StreamFollower(hub, name, EventStreamClient(ctx.http, ctx.settings.url(name), ctx.tokens),
                                  on_state=cache.on_stream_state)
        ctx.spawn(follower.run(ctx.stop), f"follow-{name}")

    async def close_sockets():
        for sock in list(sockets):
            sock.close(1001, "server going away")
    ctx.before_drain.append(close_sockets)
    return deps, gateway.routes()


def preload() -> None:
    """Import every service's modules (the supervisor does this once, before forking the services)."""
    import importlib
    for module in ("handlers.users", "handlers.catalog", "handlers.inventory", "handlers.orders",
                   "handlers.payments", "handlers.recommendations", "handlers.gateway", "services.checkout",
                   "services.demo_data", "storage.users", "storage.catalog", "storage.inventory",
                   "storage.orders", "storage.payments", "clients.cache", "ws.follower", "ws.hub",
                   "services.recommendations", "storage.recommendations", "clients.stream"):
        importlib.import_module(f"bookshop.{module}")


BUILDERS = {"users": _users, "catalog": _catalog, "inventory": _inventory, "orders": _orders,
            "payments": _payments, "recommendations": _recommendations, "gateway": _gateway}


async def build(name: str, settings: Settings, instance: str | None = None):
    ctx = ServiceContext(name, settings, with_db=name != "gateway", instance=instance)
    deps, routes = await BUILDERS[name](ctx)
    app_settings = {}
    if name == "gateway":
        app_settings = {"websocket_ping_interval": 20, "websocket_ping_timeout": 20,
                        "websocket_max_message_size": 64 * 1024}
    return ctx, make_app(ctx, routes, deps, **app_settings)


async def new_epoch(settings: Settings, service: str) -> str:
    """``python run.py new-epoch SERVICE``: the service's event stream starts another history, so every
    follower (the gateway's hub, recommendations, browsers) starts again from the state, not from seqs that
    may mean other events now (a restored backup). Running instances notice within 15 s."""
    from bookshop.storage.mongo import Database
    from bookshop.storage.outbox import EventLog
    db = Database(settings.mongodb_uri, settings.db_name(service))
    try:
        value = await EventLog(db).new_epoch()
        return f"{service}: new epoch {value}; its followers start again from a fresh snapshot"
    finally:
        db.close()


async def rotate_keys(settings: Settings) -> str:
    """``python run.py rotate-keys``: sign with a new key; keep the old one published until its tokens end."""
    from bookshop.services import accounts
    from bookshop.storage.mongo import Database
    from bookshop.storage.users import KeyRepo
    db = Database(settings.mongodb_uri, settings.db_name("users"))
    try:
        key = accounts.new_signing_key()
        keep = datetime.timedelta(seconds=max(settings.access_token_ttl, accounts.SERVICE_TOKEN_TTL) + 60)
        await KeyRepo(db).rotate(key, keep)
        return f"new signing key {key['kid']} is active; the previous key stays published for {keep}"
    finally:
        db.close()

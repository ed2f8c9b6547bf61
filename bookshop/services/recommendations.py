"""What to read next: co-purchase counts learned from the orders stream, and the lists made from them.

The rules (the contract's "Recommendations"):

* For a pair of books (X, Y) the count is the number of distinct customers who bought both, each in any of
  their confirmed or shipped orders. A customer stops counting only when no such order of theirs still holds
  the book. So what a customer holds is kept per order (``order id -> ISBNs`` of their live orders): an
  event sets one order's state, which makes applying it twice, or applying it on top of a rebuild that
  already saw it, change nothing. A pair's count moves only when a book of the customer goes from held by no
  live order to held by one, or back.
* Per book only ``PARTNERS_KEPT`` partners are stored, with the Space-Saving rule (Metwally, Agrawal and El
  Abbadi, 2005): a newcomer to a full list replaces the smallest entry and inherits its count as an error
  bound. ``count - error <= true count <= count`` holds for every entry; a list is ranked by the lower bound,
  which is the exact count as long as the book never had more partners than the list holds. Entries whose
  lower bound falls to 0 are dropped, so a listed partner was always bought together by at least one
  customer still holding both.
* ``bought_together`` first (by the number, ties by ISBN), then ``same_category`` (newest first) to fill
  ``LIMIT``; never the book itself, never one the caller bought, only books on sale.

``Learner`` follows the orders stream (through the ports it is given: a store, the orders service's
purchases pages, and the stream) and ``Recommender`` answers reads. Neither knows Tornado, motor or aiohttp.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
from collections import Counter
from operator import itemgetter
from typing import Any, Awaitable, Callable, Iterable, Protocol

from bookshop.services import errors
from bookshop.services.periodic import Backoff, repeat

log = logging.getLogger(__name__)

LIMIT = 5
PARTNERS_KEPT = 50
#: a customer counts with at most this many live orders and distinct books (a reseller's history would make
#: every one of their purchases touch thousands of lists); orders beyond are left out of the counts
MAX_ORDERS_PER_CUSTOMER = 200
MAX_BOOKS_PER_CUSTOMER = 200
#: personal lists are made from the customer's most recent books, at most this many
PERSONAL_BOOKS = 100
LIVE = frozenset({"CONFIRMED", "SHIPPED"})
ENDED = frozenset({"CANCELLED"})
ITEM_FIELDS = ("isbn", "title", "authors", "category", "price_cents", "currency")
_ISBN13 = re.compile(r"[0-9]{13}")
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

Partners = dict[str, list[int]]  # partner ISBN -> [count, error]
_first = itemgetter(0)


# -- what an orders event changes ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OrderChange:
    """One order of one customer becoming live (confirmed or shipped) or not (cancelled)."""

    user_id: str
    order_id: str
    live: bool
    isbns: tuple[str, ...] | None  # None: the event carried no lines


def order_change(event: dict) -> OrderChange | None:
    """The change an orders event (``{event, data: {id, user_id, status, lines}}``) makes to what its
    customer holds; None when it makes none (a pending order) or is not shaped as expected."""
    if event.get("event") not in ("order.created", "order.status_changed"):
        return None
    data = event.get("data")
    if not isinstance(data, dict):
        return None
    status, user_id, order_id = data.get("status"), data.get("user_id"), data.get("id")
    if status not in LIVE and status not in ENDED:
        return None
    if not (isinstance(user_id, str) and _ID.fullmatch(user_id) and isinstance(order_id, str)
            and _ID.fullmatch(order_id)):
        return None
    lines = data.get("lines")
    isbns = None
    if isinstance(lines, list):
        found = [line.get("isbn") for line in lines if isinstance(line, dict)]
        isbns = tuple(sorted({i for i in found if isinstance(i, str) and _ISBN13.fullmatch(i)}))
    return OrderChange(user_id, order_id, status in LIVE, isbns)


def purchase_change(purchase: dict) -> OrderChange | None:
    """A live order as the orders service's purchases pages list it (``{id, user_id, status, lines}``)."""
    return order_change({"event": "order.status_changed", "data": purchase})


def fingerprint(event: dict) -> str:
    """What identifies one event of one history: a stream recreated from scratch may reach the same seq,
    never with the same event (order ids and times differ)."""
    data = event.get("data") or {}
    raw = json.dumps([event.get("seq"), event.get("event"), event.get("at"), data.get("id"), data.get("status")])
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


# -- the counts ---------------------------------------------------------------------------------------------
def bump(partners: Partners, isbn: str, kept: int | None = PARTNERS_KEPT) -> None:
    """One more customer bought ``isbn`` with the list's book (``kept`` None: the list is unbounded)."""
    entry = partners.get(isbn)
    if entry is not None:
        entry[0] += 1
    elif kept is None or len(partners) < kept:
        partners[isbn] = [1, 0]
    else:
        # Space-Saving: the newcomer takes the smallest entry's place (ties: the largest ISBN, the one
        # ranked last) and that entry's count as its error bound
        count = min(map(_first, partners.values()))
        smallest = max([k for k, entry in partners.items() if entry[0] == count])  # ISBN-13s compare as strings
        del partners[smallest]
        partners[isbn] = [count + 1, count]


def unbump(partners: Partners, isbn: str) -> None:
    """One customer fewer holds both; an entry no customer is known to hold any more goes."""
    entry = partners.get(isbn)
    if entry is None:
        return
    entry[0] -= 1
    entry[1] = min(entry[1], entry[0])
    if entry[0] - entry[1] <= 0:
        del partners[isbn]


def top(partners: Partners, kept: int = PARTNERS_KEPT) -> Partners:
    """The ``kept`` entries ranked first (by lower bound, ties by ISBN). Every partner left out has at most
    the count of the last one kept, so the Space-Saving bound still holds for a newcomer later."""
    ranked = sorted(partners, key=lambda k: (-(partners[k][0] - partners[k][1]), k))[:kept]
    return {k: partners[k] for k in ranked}


@dataclasses.dataclass(frozen=True)
class Delta:
    book: str     # whose list changes
    partner: str  # the entry that changes
    step: int     # +1 or -1


class CoPurchases:
    """What customers hold and the partner lists, for the customers and books loaded into it.

    ``hold`` updates a customer's holdings and returns the list changes it implies; ``count`` applies them
    (separate, so a store can load exactly the lists the changes name); ``learn`` does both. What changed is
    in ``dirty_customers`` and ``dirty_books``, and the list changes in ``counted``.
    """

    def __init__(self, holdings: dict[str, dict[str, list[str]]] | None = None,
                 partners: dict[str, Partners] | None = None, kept: int | None = PARTNERS_KEPT):
        self.holdings = holdings if holdings is not None else {}
        self.partners = partners if partners is not None else {}
        self.kept = kept
        self.dirty_customers: set[str] = set()
        self.dirty_books: set[str] = set()
        self.counted: list[Delta] = []  # the list changes applied, in order: what a store can apply again

    @staticmethod
    def books_of(orders: dict[str, list[str]]) -> set[str]:
        return {isbn for isbns in orders.values() for isbn in isbns}

    def hold(self, change: OrderChange) -> list[Delta]:
        orders = self.holdings.get(change.user_id, {})
        before = self.books_of(orders)
        if change.live:
            if change.order_id in orders or not change.isbns:
                return []  # already counted (a repeat, or shipped after confirmed), or nothing to count
            after = before | set(change.isbns)
            if len(orders) >= MAX_ORDERS_PER_CUSTOMER or len(after) > MAX_BOOKS_PER_CUSTOMER:
                return []
            self.holdings[change.user_id] = {**orders, change.order_id: list(change.isbns)}
        else:
            if change.order_id not in orders:
                return []  # never counted (pending when cancelled, or left out), or already gone
            orders = {k: v for k, v in orders.items() if k != change.order_id}
            after = self.books_of(orders)
            if orders:
                self.holdings[change.user_id] = orders
            else:
                del self.holdings[change.user_id]
        self.dirty_customers.add(change.user_id)
        return pair_deltas(after - before, before - after, before & after)

    def count(self, deltas: Iterable[Delta]) -> None:
        for d in deltas:
            self.counted.append(d)
            partners = self.partners.setdefault(d.book, {})
            if d.step > 0:
                bump(partners, d.partner, self.kept)
            else:
                unbump(partners, d.partner)
            self.dirty_books.add(d.book)

    def learn(self, change: OrderChange) -> None:
        self.count(self.hold(change))

    def truncate(self, kept: int = PARTNERS_KEPT) -> None:
        """Bound every list (after counting unbounded, as a rebuild does, for exact counts at the top)."""
        self.partners = {book: top(p, kept) for book, p in self.partners.items() if p}
        self.kept = kept

    def held(self, user_id: str) -> list[str]:
        return held_books(self.holdings.get(user_id, {}))


def pair_deltas(added: set[str], removed: set[str], kept: set[str]) -> list[Delta]:
    """The list changes when a customer's books ``added`` become held (``kept`` still are) or ``removed``
    stop being held. Deterministic order (a list that overflows depends on it)."""
    out: list[Delta] = []
    for books, step in ((added, 1), (removed, -1)):
        if not books:
            continue
        others = sorted(books | kept)
        for book in sorted(books):
            out.extend(Delta(book, other, step) for other in others if other != book)
            out.extend(Delta(other, book, step) for other in sorted(kept))
    return out


def held_books(orders: dict[str, list[str]]) -> list[str]:
    """A customer's books, those of their most recent orders first (order ids grow with time)."""
    seen: dict[str, None] = {}
    for order_id in sorted(orders, reverse=True):
        for isbn in orders[order_id]:
            seen.setdefault(isbn, None)
    return list(seen)


def ranked_partners(lists: Iterable[Partners], exclude: set[str]) -> list[str]:
    """Partners of the given books by the number of customers who bought them together (summed over the
    books), ties by ISBN; never one of ``exclude``."""
    scores: Counter[str] = Counter()
    for partners in lists:
        for isbn, (count, error) in partners.items():
            if isbn not in exclude and count - error > 0:
                scores[isbn] += count - error
    return sorted(scores, key=lambda isbn: (-scores[isbn], isbn))


def ranked_categories(books: Iterable[dict]) -> list[str]:
    """A customer's categories: where most of their books are first, ties by name."""
    counts = Counter(b["category"] for b in books)
    return sorted(counts, key=lambda c: (-counts[c], c))


def item(book: dict, reason: str) -> dict:
    return {**{k: book[k] for k in ITEM_FIELDS}, "reason": reason}


# -- reads ----------------------------------------------------------------------------------------------------
class Catalog(Protocol):
    async def books(self, isbns: list[str]) -> dict[str, dict]: ...
    async def newest(self, category: str, limit: int) -> list[dict]: ...


class ReadStore(Protocol):
    async def partners_of(self, isbns: list[str]) -> dict[str, Partners]: ...
    async def held_books(self, user_id: str) -> list[str]: ...


class Recommender:
    """``GET /recommendations``: for a reader of a book, or for a customer from what they bought."""

    def __init__(self, catalog: Catalog, store: ReadStore, limit: int = LIMIT):
        self.catalog = catalog
        self.store = store
        self.limit = limit

    async def _held(self, customer: str | None) -> list[str]:
        return await self.store.held_books(customer) if customer else []

    async def for_book(self, isbn: str, customer: str | None = None) -> list[dict]:
        lists, held = await asyncio.gather(self.store.partners_of([isbn]), self._held(customer))
        exclude = set(held) | {isbn}
        ranked = ranked_partners(lists.values(), exclude)
        # the book itself comes with its first candidates: one catalog call where two would do
        on_sale = await self.catalog.books([isbn] + ranked[:self._first])
        book = on_sale.get(isbn)
        if book is None:
            raise errors.NotFound("no such book", code="book_not_found")
        return await self._fill(ranked, [book["category"]], exclude, on_sale)

    async def for_customer(self, customer: str) -> list[dict]:
        held = await self.store.held_books(customer)
        if not held:
            return []
        recent = held[:PERSONAL_BOOKS]
        lists, books = await asyncio.gather(self.store.partners_of(recent), self.catalog.books(recent))
        exclude = set(held)
        return await self._fill(ranked_partners(lists.values(), exclude), ranked_categories(books.values()),
                                exclude)

    async def _newest(self, category: str, skip: int) -> list[dict]:
        # enough of them to still have ``limit`` after the exclusions (an indexed read of a few books)
        return await self.catalog.newest(category, min(100, self.limit + skip))

    @property
    def _first(self) -> int:
        # candidates checked for being on sale in the first catalog call: the embedded server's cost of an
        # ``$in`` grows with its ids, and the first few are almost always on sale
        return self.limit + 1

    def _chunks(self, ranked: list[str]):
        yield 0, ranked[:self._first]
        for start in range(self._first, len(ranked), 3 * self.limit):
            yield start, ranked[start:start + 3 * self.limit]

    async def _fill(self, ranked: list[str], categories: list[str], exclude: set[str],
                    on_sale: dict[str, dict] | None = None) -> list[dict]:
        picks: list[dict] = []
        chosen: set[str] = set()
        newest: list[dict] | None = None
        for start, candidates in self._chunks(ranked):
            if not candidates:
                break
            if start > 0 or on_sale is None:
                if start == 0 and len(candidates) < self.limit and categories:
                    # not enough to fill the list whatever is on sale: ask for the category's books meanwhile
                    on_sale, newest = await asyncio.gather(
                        self.catalog.books(candidates), self._newest(categories[0], len(exclude) + len(candidates)))
                else:
                    on_sale = await self.catalog.books(candidates)
            for isbn in candidates:
                if isbn in on_sale and len(picks) < self.limit:
                    picks.append(item(on_sale[isbn], "bought_together"))
                    chosen.add(isbn)
            if len(picks) >= self.limit:
                return picks
        for n, category in enumerate(categories):
            if len(picks) >= self.limit:
                break
            if n > 0 or newest is None:
                newest = await self._newest(category, len(exclude) + len(chosen))
            for book in newest:
                if book["isbn"] not in exclude and book["isbn"] not in chosen and len(picks) < self.limit:
                    picks.append(item(book, "same_category"))
                    chosen.add(book["isbn"])
        return picks


# -- following the orders stream -------------------------------------------------------------------------------
@dataclasses.dataclass
class StreamState:
    """Where the counts stand in the orders stream."""

    built: bool = False            # a rebuild finished (False: never built, or one was cut short)
    epoch: str | None = None       # the stream's epoch when it names one
    last_seq: int = 0              # the last event applied
    last_event: str | None = None  # fingerprint of that event (None right after a rebuild)


def rebuild_reason(state: StreamState, hello: dict) -> str | None:
    """Why the counts must be rebuilt from the orders service before following the stream from ``hello``
    (``{seq, oldest, epoch?}``, the stream's head and oldest retained event), or None to resume."""
    if not state.built:
        return "never built"
    if hello.get("epoch") != state.epoch:
        return "a new epoch"
    head, oldest = int(hello.get("seq", 0)), int(hello.get("oldest", 0))
    if head < state.last_seq:
        return "the stream is behind what was applied (a new history)"
    if head > state.last_seq and (oldest == 0 or oldest > state.last_seq + 1):
        return "the events after the last one applied are gone"
    return None


class NeedsRebuild(Exception):
    """The events met do not continue what was applied."""


class BatchTooLarge(Exception):
    """A batch writes more than a store commits at once: commit it in parts."""


class Store(ReadStore, Protocol):
    async def take_lease(self, owner: str, seconds: float) -> bool: ...
    async def release_lease(self, owner: str) -> None: ...
    async def state(self, finish: bool = True) -> StreamState: ...
    async def holdings_of(self, user_ids: list[str]) -> dict[str, dict[str, list[str]]]: ...
    async def commit(self, before: StreamState, after: StreamState, model: CoPurchases) -> bool: ...
    async def replace_all(self, owner: str, model: CoPurchases, state: StreamState,
                          keep_lease: Callable[[], Awaitable[bool]]) -> bool: ...


#: the purchases pages: ``(after order id) -> (purchases, next order id or None)``
Purchases = Callable[[str | None, int], Awaitable[tuple[list[dict], str | None]]]
#: opens the stream: ``(after seq or None for "from now", epoch, sink)``, hands every frame (hello, then
#: events) to ``sink`` in order, returns when the stream ends; raises ``errors.Unavailable``
Follow = Callable[[int | None, str | None, Callable[[dict], Awaitable[None]]], Awaitable[None]]

_END = {"type": "end"}


class Recommend:
    """The use case of ``GET /recommendations``: for a reader of ``isbn`` (less what ``customer`` holds), or
    without a book for a signed-in ``customer`` from what they bought. Answers the items and the orders
    ``seq`` the counts had reached (read first: the counts can only be newer)."""

    def __init__(self, recommender: Recommender, position: Callable[[], int]):
        self.recommender = recommender
        self.position = position

    async def __call__(self, isbn: str | None, customer: str | None) -> tuple[list[dict], int]:
        seq = self.position()
        if isbn is not None:
            return await self.recommender.for_book(isbn, customer), seq
        if customer is not None:
            return await self.recommender.for_customer(customer), seq
        raise errors.InvalidInput("isbn: required unless signed in as a customer", code="invalid_field",
                                  details={"field": "isbn"})


class Learner:
    """Keeps the counts in step with the orders stream: one event after another in ``seq`` order, each batch
    committed with the last ``seq`` it applied (so a restart resumes where the last commit left off and
    nothing is counted twice), and a rebuild from the orders service's purchases when the stream cannot
    continue what was applied. One instance at a time follows (a lease); the commit is also fenced by the
    ``seq`` it continues, so two that both thought they held it cannot both apply an event."""

    def __init__(self, store: Store, purchases: Purchases, follow: Follow, *, owner: str, metrics=None,
                 batch: int = 500, lease_seconds: float = 6.0, page: int = 500, linger: float = 0.1):
        self.store = store
        self.purchases = purchases
        self.follow = follow
        self.owner = owner
        self.metrics = metrics
        self.batch = batch
        self.lease_seconds = lease_seconds
        self.page = page
        self.linger = linger
        self.state = StreamState()
        self.applied = 0
        self.following = asyncio.Event()
        self._force_rebuild = False

    def _count(self, name: str, amount: float = 1) -> None:
        if self.metrics is not None:
            self.metrics.count(name, amount)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.gauge("orders_seq_applied", self.state.last_seq)

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(0.2, 5.0)

        async def one_pass() -> float:
            try:
                if not await self.store.take_lease(self.owner, self.lease_seconds):
                    # another instance follows: keep up with where it got, for the answers' X-Orders-Seq (only
                    # reading it: what the follower writes is the follower's to finish); look again in a while
                    self.state = await self.store.state(finish=False)
                    return self.lease_seconds / 3
                outcome = await self.follow_once(stop)
                if outcome == "rebuilt":
                    return 0  # follow from the rebuild's point at once
                if outcome == "followed":
                    backoff.reset()
                return backoff.wait()
            finally:
                self.following.clear()
        # the follower must outlive a bad pass (db or orders down)
        await repeat(stop, one_pass, "following the orders stream", backoff.wait)

    async def release(self) -> None:
        """Give the lease up (on shutdown), so the next instance, or this one restarted, follows at once."""
        try:
            await self.store.release_lease(self.owner)
        except Exception as exc:  # noqa: BLE001 - shutting down regardless; the lease then runs out by itself
            log.warning("could not release the follower lease: %s", exc)

    async def _renew(self) -> bool:
        return await self.store.take_lease(self.owner, self.lease_seconds)

    def _resume_point(self) -> int | None:
        if self._force_rebuild or not self.state.built:
            return None  # from now on: the rebuild covers the past
        # see the last applied event again: to check it is the same one, or (right after a rebuild, which
        # knows only the stream's head) to learn what it is
        return max(0, self.state.last_seq - 1)

    async def follow_once(self, stop: asyncio.Event) -> str:
        """One connection to the stream, until it ends or the lease is lost: ``"rebuilt"`` (the counts were
        rebuilt, to be followed from the rebuild's point), ``"followed"`` (the stream was followed until it
        ended) or ``"failed"`` (no hello came)."""
        self.state = await self.store.state()
        self._gauge()
        after = self._resume_point()
        frames: asyncio.Queue = asyncio.Queue(maxsize=2 * self.batch)  # full: the socket is not read

        async def read() -> None:
            try:
                await self.follow(after, self.state.epoch, frames.put)
            except errors.DomainError as exc:
                log.debug("orders stream: %s", exc)
            finally:
                await frames.put(_END)
        reader = asyncio.ensure_future(read())
        try:
            hello = await asyncio.wait_for(frames.get(), 10.0)
            if hello.get("type") != "hello":
                return "failed"
            reason = "never built, or asked for" if after is None else rebuild_reason(self.state, hello)
            if reason is not None:
                await self.rebuild(hello, reason)
                return "rebuilt"  # and follow from the rebuild's point, on a new connection
            self.following.set()
            await self._consume(frames, stop)
            return "followed"
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _consume(self, frames: asyncio.Queue, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                first = await asyncio.wait_for(frames.get(), self.lease_seconds / 3)
            except asyncio.TimeoutError:
                if not await self._renew():
                    return
                continue
            if frames.empty() and first is not _END and self.linger:
                # a moment for more to arrive: a batch writes each list it touches once, whatever the
                # number of its events that touch it
                await asyncio.sleep(self.linger)
            batch = [first]
            while len(batch) < self.batch and not frames.empty():
                batch.append(frames.get_nowait())
            events = [f for f in batch if f.get("type") == "event"]
            if events:
                if not await self._renew():
                    return
                try:
                    if not await self.apply(events):
                        return  # another instance applied meanwhile: start again from the store
                except NeedsRebuild as exc:
                    log.warning("orders stream: %s; rebuilding", exc)
                    self._force_rebuild = True
                    return
            if any(f is _END for f in batch):
                return

    async def apply(self, events: list[dict]) -> bool:
        """Apply a batch of events (in seq order) past what was applied. False if the commit found the
        store moved on (another follower)."""
        before = dataclasses.replace(self.state)
        todo: list[tuple[dict, OrderChange | None]] = []
        last_seq, last_event = before.last_seq, before.last_event
        for event in events:
            seq = event.get("seq")
            if not isinstance(seq, int):
                continue
            if seq <= last_seq:
                if seq == last_seq and last_event is None:
                    last_event = fingerprint(event)  # the rebuild's point: remember what it is
                elif seq == last_seq and fingerprint(event) != last_event:
                    raise NeedsRebuild(f"event {seq} is not the one applied: a new history")
                continue
            if seq != last_seq + 1:
                raise NeedsRebuild(f"event {last_seq + 1} is missing (got {seq})")
            todo.append((event, order_change(event)))
            last_seq, last_event = seq, fingerprint(event)
        if not todo and last_event == before.last_event:
            return True
        changes = [c for _, c in todo if c is not None]
        without_lines = sum(1 for c in changes if c.live and c.isbns is None)
        model = CoPurchases(await self.store.holdings_of(sorted({c.user_id for c in changes})))
        deltas = [d for c in changes for d in model.hold(c)]
        model.partners = await self.store.partners_of(sorted({d.book for d in deltas}))
        model.count(deltas)
        after = dataclasses.replace(before, last_seq=last_seq, last_event=last_event)
        try:
            committed = await self.store.commit(before, after, model)
        except BatchTooLarge:
            if len(events) < 2:
                raise
            half = len(events) // 2
            return await self.apply(events[:half]) and await self.apply(events[half:])
        if not committed:
            return False
        self.state = after
        self.applied += len(todo)
        self._count("orders_events_applied", len(todo))
        if without_lines:
            self._count("orders_events_without_lines", without_lines)
        self._gauge()
        return True

    async def rebuild(self, hello: dict, reason: str) -> None:
        """Count again from every confirmed and shipped order, then follow the stream from ``hello``'s
        head: an event past it that the pages already reflected changes nothing when applied again (events
        set an order's state), and one they missed is applied."""
        log.info("rebuilding the co-purchase counts from the orders service (%s)", reason)
        model = CoPurchases(kept=None)  # exact counts first, bounded once all are in
        after: str | None = None
        while True:
            items, after = await self.purchases(after, self.page)
            for purchase in items:
                change = purchase_change(purchase)
                if change is not None and change.live:
                    model.learn(change)
            if not await self._renew():
                raise errors.Unavailable("lost the follower lease during a rebuild")
            if after is None:
                break
        model.truncate()
        state = StreamState(built=True, epoch=hello.get("epoch"), last_seq=int(hello.get("seq", 0)))
        if not await self.store.replace_all(self.owner, model, state, self._renew):
            raise errors.Unavailable("lost the follower lease during a rebuild")
        self.state = state
        self._force_rebuild = False
        self._count("recommendations_rebuilds")
        self._gauge()
        log.info("co-purchase counts rebuilt: %d customers, %d books, from seq %d", len(model.holdings),
                 len(model.partners), state.last_seq)


def partners_doc(partners: Partners) -> dict[str, Any]:
    """A partner list as stored (and back: the same shape, ``{isbn: [count, error]}``)."""
    return {isbn: [int(c), int(e)] for isbn, (c, e) in partners.items()}

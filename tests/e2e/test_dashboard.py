"""The live dashboard in headless Chromium (Debian's chromium driven by PyPI playwright): a shop manager's page.

Orders placed elsewhere move the tiles, the chart and the feed; a restock in one browser flashes the row in
another; ship and cancel work in place and the customer sees their order move; a gateway restart under an open
page shows "reconnecting", then catches up with no event missing (compared with REST); nothing logs a console
error or gets a 404. One shop (of this module's own: its gateway is restarted) and one browser serve the module;
each test opens its own browser contexts (separate sessionStorage: separate sign-ins). Every wait is a condition
with a generous deadline; how fast pixels follow events is measured by bench/dashboard_latency.py, not here.
"""
from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import pytest

from client import fresh_isbn
from harness import ADMIN_EMAIL, ADMIN_PASSWORD, RUN_PY, Shop

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
WAIT_MS = 15000  # generous: a loaded CI machine, services under coverage
CARD = {"card_number": "4242424242424242", "exp_month": 12, "exp_year": 2035, "cvc": "123"}
ADDRESS = {"name": "Ann Reader", "line1": "1 Book Street", "city": "Lyon", "postal_code": "69001", "country": "FR"}


def early_isbn() -> str:
    """A new ISBN-13 that sorts near the start (979000...), so its level is in the inventory snapshot."""
    return fresh_isbn("979000")


def call(method: str, url: str, body=None, token: str | None = None, headers: dict | None = None):
    """A JSON request with the standard library (the browser tests keep clear of event loops)."""
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data, hdrs, method=method), timeout=20) as resp:
        return json.loads(resp.read() or b"null")


class Client:
    """A signed-in API user (staff, or a customer registered for the test)."""

    def __init__(self, shop, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD):
        self.shop, self.email, self.password = shop, email, password
        self.token = call("POST", shop.api + "/tokens", {"email": email, "password": password})["access_token"]
        self.id = call("GET", shop.api + "/users/me", token=self.token)["id"]

    @classmethod
    def customer(cls, shop) -> "Client":
        email = f"reader-{uuid.uuid4().hex[:10]}@example.com"
        call("POST", shop.api + "/users", {"email": email, "password": "password-123", "name": "Ann Reader"})
        return cls(shop, email, "password-123")

    def new_book(self, stock: int, price_cents: int = 1750) -> str:
        isbn = early_isbn()
        call("POST", self.shop.api + "/books", {"isbn": isbn, "title": f"Live {isbn}", "authors": ["A. Author"],
                                                "category": "testing", "price_cents": price_cents,
                                                "currency": "EUR"}, self.token)
        self.restock(isbn, stock)
        return isbn

    def restock(self, isbn: str, quantity: int, service: str = "gateway") -> dict:
        return call("POST", f"{self.shop.url(service)}/api/v1/inventory/{isbn}/restock", {"quantity": quantity},
                    self.token)

    def order(self, isbn: str, quantity: int, service: str = "gateway") -> dict:
        return call("POST", f"{self.shop.url(service)}/api/v1/orders",
                    {"items": [{"isbn": isbn, "quantity": quantity}], "shipping_address": ADDRESS, "payment": CARD},
                    self.token, {"Idempotency-Key": uuid.uuid4().hex})

    def get(self, path: str):
        return call("GET", self.shop.api + path, token=self.token)


def in_chromium(test):
    """Skips the test where Chromium is missing, saying what to install. The skip is raised here rather than
    in the browser fixture, so the run reports it once (a fixture's skip is reported at every test)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        if kwargs.get("browser") is None:
            pytest.skip(f"browser test of the live dashboard NOT RUN: no Chromium at {CHROMIUM} "
                        "(apt-get install chromium; bash .ci/run installs it)")
        return test(*args, **kwargs)
    return run


@pytest.fixture(scope="module")
def browser():
    """One Chromium for the module (None where there is none: see ``in_chromium``)."""
    if not os.path.exists(CHROMIUM):
        yield None
        return
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def live_shop(browser, request):
    """The module's own shop: its gateway is restarted under open pages, and no other test leaves books or
    orders behind in it. Made only where Chromium is (tests/integration/test_browser_skip.py runs without it)."""
    if browser is None:
        yield None
        return
    shop = Shop(request.getfixturevalue("mongodb_uri"), log_dir=request.getfixturevalue("log_dir"))
    try:
        shop.start()
        yield shop
    finally:
        shop.stop()


@pytest.fixture
def contexts(browser):
    """Browser contexts a test opens (``contexts(**options)``), closed when it ends."""
    made = []

    def new(**options):
        made.append(browser.new_context(**options))
        return made[-1]
    yield new
    for context in made:
        context.close()


class Watched:
    """A page with everything that would make a user frown collected: uncaught errors, console errors and
    HTTP answers of 400 or more (a 404 asset, a favicon, an API call the page should not make)."""

    def __init__(self, context, shop):
        self.page = context.new_page()
        self.shop = shop
        self.errors: list[str] = []
        self.bad: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(f"console: {msg.text}"))
        self.page.on("response", lambda r: r.status >= 400 and self.bad.append(f"{r.status} {r.url}"))

    def open(self) -> "Watched":
        self.page.goto(self.shop.url("gateway") + "/")
        expect(self.page.locator("#conn-state")).to_have_text("live", timeout=WAIT_MS)
        return self

    def sign_in(self, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD) -> "Watched":
        self.page.fill("#signin-email", email)
        self.page.fill("#signin-password", password)
        self.page.click("#signin-button")
        expect(self.page.locator("#user-panel")).to_be_visible(timeout=WAIT_MS)
        if email == ADMIN_EMAIL:
            expect(self.page.locator("#tile-confirmed")).not_to_have_text("—", timeout=WAIT_MS)
        return self

    def dashboard(self, expression: str):
        return self.page.evaluate(f"window.bookshopDashboard.{expression}")

    def row(self, isbn: str):
        return self.page.locator(f'tr[data-isbn="{isbn}"]')

    def available(self, isbn: str):
        """The stock table's "available" cell of the title."""
        return self.row(isbn).locator('td[data-col="available"]')

    def title(self, isbn: str):
        return self.row(isbn).locator('td[data-col="title"]')

    def order(self, order_id: str):
        return self.page.locator(f'li[data-order-id="{order_id}"]')


def expect(locator):
    from playwright.sync_api import expect as playwright_expect
    return playwright_expect(locator)


def number(text: str) -> float:
    return float(re.sub(r"[^0-9.]", "", text.replace(",", "")) or 0)


# Waits go through locators: the page's CSP forbids the eval that wait_for_function would need, and the
# dashboard is tested under its real policy.

@in_chromium
def test_the_page_loads_with_no_console_error_and_no_404(browser, live_shop, contexts):
    staff = Client(live_shop)
    isbn = staff.new_book(stock=3)
    context = contexts()
    seen = []
    page = Watched(context, live_shop)
    page.page.on("response", lambda r: seen.append((r.status, r.url)))
    page.open()
    expect(page.available(isbn)).to_have_text("3", timeout=WAIT_MS)
    expect(page.page.locator("#tile-low")).not_to_have_text("—", timeout=WAIT_MS)
    page.sign_in()
    expect(page.page.locator("#chart-desc")).to_contain_text("in the last hour", timeout=WAIT_MS)
    # the favicon is the page's own (no /favicon.ico 404), and the title of the row was looked up
    assert any(status == 200 and url.endswith("/static/favicon.svg") for status, url in seen), seen
    expect(page.title(isbn)).to_have_text(f"Live {isbn}", timeout=WAIT_MS)
    page.page.reload()  # a reload keeps the sign-in (the refresh token is in sessionStorage) and logs nothing
    expect(page.page.locator("#tile-confirmed")).not_to_have_text("—", timeout=WAIT_MS)
    stored = page.page.evaluate("Object.keys(localStorage).length")
    assert stored == 0, "nothing of the sign-in lives in localStorage"
    assert page.errors == [] and page.bad == [], page.errors + page.bad


@in_chromium
def test_an_order_placed_by_another_client_moves_the_tiles_the_chart_and_the_feed(browser, live_shop, contexts):
    staff = Client(live_shop)
    isbn = staff.new_book(stock=10, price_cents=1750)
    context = contexts()
    page = Watched(context, live_shop).open().sign_in()
    tiles = {name: page.page.locator(f"#tile-{name}") for name in ("confirmed", "revenue", "open")}
    before = {name: number(tile.inner_text()) for name, tile in tiles.items()}
    charted = int(page.page.locator("#chart-bars").get_attribute("data-total") or 0)

    order = Client.customer(live_shop).order(isbn, 2)
    assert order["status"] == "CONFIRMED"
    expect(tiles["confirmed"]).to_have_text(str(int(before["confirmed"]) + 1), timeout=WAIT_MS)
    expect(tiles["open"]).to_have_text(str(int(before["open"]) + 1), timeout=WAIT_MS)
    expect(page.page.locator("#chart-bars")).to_have_attribute("data-total", str(charted + 1), timeout=WAIT_MS)
    feed = page.page.locator("#event-feed")
    expect(feed).to_contain_text(f"Order …{order['id'][-6:]} confirmed — 2 books, €35.00", timeout=WAIT_MS)
    assert number(tiles["revenue"].inner_text()) == pytest.approx(before["revenue"] + 35.0)
    assert page.page.locator("#event-feed").get_attribute("aria-live") == "polite"
    # the tiles agree with the API
    summary = staff.get("/orders/summary")
    assert tiles["confirmed"].inner_text() == str(summary["orders_confirmed"])
    assert page.errors == [] and page.bad == [], page.errors + page.bad


@in_chromium
def test_a_restock_in_one_browser_flashes_the_row_in_another(browser, live_shop, contexts):
    isbn = Client(live_shop).new_book(stock=3)
    acting, watching = contexts(), contexts(reduced_motion="reduce")
    one = Watched(acting, live_shop).open().sign_in()
    other = Watched(watching, live_shop).open()  # anyone may watch the stock
    for page in (one, other):
        expect(page.available(isbn)).to_have_text("3", timeout=WAIT_MS)
    # the feed names a title the page already knows (it fetches titles lazily): wait for it before the event
    expect(other.title(isbn)).to_have_text(f"Live {isbn}", timeout=WAIT_MS)
    assert other.row(isbn).get_attribute("data-flashes") is None
    expect(other.row(isbn).locator("td.restock")).to_be_hidden()  # no staff controls for the anonymous

    one.row(isbn).locator("td.restock input").fill("4")
    one.row(isbn).locator("td.restock button").click()
    expect(other.available(isbn)).to_have_text("7", timeout=WAIT_MS)
    expect(other.row(isbn)).to_have_attribute("data-flashes", "1", timeout=WAIT_MS)
    expect(one.available(isbn)).to_have_text("7", timeout=WAIT_MS)
    # who asked for no motion gets an outline, not an animation
    assert other.page.evaluate(
        f"getComputedStyle(document.querySelector('tr[data-isbn=\"{isbn}\"]')).animationName") == "none"
    expect(other.page.locator("#event-feed")).to_contain_text(f"Stock of “Live {isbn}”: 7 available (+4)",
                                                              timeout=WAIT_MS)

    # sorted by what is available, the lowest first: the restocked title moves down past a low one
    low = Client(live_shop).new_book(stock=1)
    expect(other.row(low)).to_be_visible(timeout=WAIT_MS)
    other.page.click('th[data-sort="available"] button')  # most available first
    other.page.click('th[data-sort="available"] button')  # least available first
    expect(other.page.locator('th[data-sort="available"]')).to_have_attribute("aria-sort", "ascending")
    order = other.page.locator("#stock-body tr").evaluate_all("rows => rows.map(r => r.dataset.isbn)")
    assert order.index(low) < order.index(isbn)
    other.page.fill("#stock-filter", isbn)
    expect(other.row(low)).to_be_hidden()
    expect(other.row(isbn)).to_be_visible()
    for page in (one, other):
        assert page.errors == [] and page.bad == [], page.errors + page.bad


@in_chromium
def test_ship_and_cancel_work_in_place_and_the_customer_sees_their_orders_move(browser, live_shop, contexts):
    staff = Client(live_shop)
    isbn = staff.new_book(stock=10)
    customer = Client.customer(live_shop)
    staff_context, customer_context = contexts(), contexts()
    manager = Watched(staff_context, live_shop).open().sign_in()
    reader = Watched(customer_context, live_shop).open().sign_in(customer.email, customer.password)
    expect(reader.page.locator("#orders-hint")).to_have_text("Your orders.")
    shipped, cancelled = customer.order(isbn, 1), customer.order(isbn, 2)
    for page in (manager, reader):
        for order in (shipped, cancelled):
            expect(page.order(order["id"]).locator(".status")).to_have_text("CONFIRMED", timeout=WAIT_MS)
    expect(reader.order(shipped["id"]).locator('button[data-action="ship"]')).to_have_count(0)

    manager.order(shipped["id"]).locator('button[data-action="ship"]').click()
    for page in (manager, reader):
        expect(page.order(shipped["id"]).locator(".status")).to_have_text("SHIPPED", timeout=WAIT_MS)
    expect(manager.order(shipped["id"]).locator("button")).to_have_count(0)  # nothing left to do with it

    # the customer cancels their own order in place (a second click confirms)
    cancel = reader.order(cancelled["id"]).locator('button[data-action="cancel"]')
    cancel.click()
    expect(cancel).to_have_text("Confirm cancel")
    cancel.click()
    for page in (manager, reader):
        expect(page.order(cancelled["id"]).locator(".status")).to_have_text("CANCELLED", timeout=WAIT_MS)
    assert customer.get(f"/orders/{shipped['id']}")["status"] == "SHIPPED"
    assert customer.get(f"/orders/{cancelled['id']}")["status"] == "CANCELLED"
    expect(manager.available(isbn)).to_have_text("9", timeout=WAIT_MS)
    expect(manager.page.locator("#event-feed")).to_contain_text(f"Order …{cancelled['id'][-6:]} cancelled",
                                                                timeout=WAIT_MS)
    for page in (manager, reader):
        assert page.errors == [] and page.bad == [], page.errors + page.bad


@in_chromium
def test_a_gateway_restart_shows_reconnecting_then_catches_up_with_no_missing_event(browser, live_shop, contexts):
    staff = Client(live_shop)
    isbn = staff.new_book(stock=3)
    customer = Client.customer(live_shop)
    context = contexts()
    watched = Watched(context, live_shop).open().sign_in()
    page = watched.page
    expect(watched.available(isbn)).to_have_text("3", timeout=WAIT_MS)
    staff.restock(isbn, 4)
    expect(watched.available(isbn)).to_have_text("7", timeout=WAIT_MS)
    seen = {channel: watched.dashboard(f"lastSeq['{channel}']") for channel in ("inventory", "orders")}
    confirmed = int(page.locator("#tile-confirmed").inner_text())

    # the gateway goes away; meanwhile stock and an order change, straight at their services
    live_shop.kill("gateway", signal.SIGTERM)
    expect(page.locator("#conn-state")).to_have_text(re.compile(r"reconnecting \(attempt \d+\)"),
                                                     timeout=WAIT_MS)
    staff.restock(isbn, 5, service="inventory")
    staff.restock(isbn, 1, service="inventory")
    order = customer.order(isbn, 2, service="orders")
    assert order["status"] == "CONFIRMED"
    live_shop.start("gateway")

    expect(page.locator("#conn-state")).to_have_text("live", timeout=WAIT_MS)
    expect(page.locator("#conn-detail")).to_contain_text("none missed", timeout=WAIT_MS)
    # what the page shows is what REST says
    level = call("GET", f"{live_shop.api}/inventory/{isbn}")
    assert level["available"] == 7 + 5 + 1 - 2
    expect(watched.available(isbn)).to_have_text(str(level["available"]))
    expect(watched.order(order["id"]).locator(".status")).to_have_text(
        staff.get(f"/orders/{order['id']}")["status"])
    expect(page.locator("#tile-confirmed")).to_have_text(str(confirmed + 1), timeout=WAIT_MS)
    # every seq after the last one seen before the restart arrived, once, in order
    for channel in ("inventory", "orders"):
        received = [s for s in watched.dashboard(f"received['{channel}']") if s > seen[channel]]
        assert received == list(range(seen[channel] + 1, seen[channel] + 1 + len(received))), (channel, received)
        assert received, channel
    expect(page.locator("#event-feed")).to_contain_text(f"Order …{order['id'][-6:]} confirmed — 2 books")

    # and it is live again, not just caught up
    staff.restock(isbn, 1)
    available = watched.available(isbn)
    expect(available).to_have_text(str(level["available"] + 1), timeout=WAIT_MS)
    # the browser logs its failed connection attempts to the gateway that was away; nothing else
    assert all("WebSocket" in e or "ERR_CONNECTION_REFUSED" in e for e in watched.errors), watched.errors


@in_chromium
def test_the_gateway_back_before_the_inventory_service_says_so_then_goes_live(browser, live_shop, contexts):
    staff = Client(live_shop)
    isbn = staff.new_book(stock=3)
    context = contexts()
    watched = Watched(context, live_shop).open()
    page = watched.page
    expect(watched.available(isbn)).to_have_text("3", timeout=WAIT_MS)
    live_shop.kill("inventory", signal.SIGKILL)
    with page.expect_console_message(lambda msg: "server error unavailable" in msg.text, timeout=WAIT_MS):
        live_shop.kill("gateway", signal.SIGTERM)
        live_shop.start("gateway")
    # a one-shot look (a 1 ms deadline), not a wait: with inventory down the page cannot be live, so the
    # state is whatever it shows now, and "reconnecting" or "unavailable" are both right
    expect(page.locator("#conn-state")).not_to_have_text("live", timeout=1)
    live_shop.start("inventory")
    expect(page.locator("#conn-state")).to_have_text("live", timeout=30000)
    staff.restock(isbn, 2)  # the gateway may not follow the new inventory process yet: a generous wait
    expect(watched.available(isbn)).to_have_text("5", timeout=WAIT_MS)
    assert [e for e in watched.errors if e.startswith("pageerror")] == []


@in_chromium
def test_offline_says_so_and_coming_back_catches_up(browser, live_shop, contexts):
    staff = Client(live_shop)
    isbn = staff.new_book(stock=3)
    context = contexts()
    watched = Watched(context, live_shop).open()
    page = watched.page
    expect(watched.available(isbn)).to_have_text("3", timeout=WAIT_MS)
    # the feed names a title the page already knows (it fetches titles lazily, so one still being fetched when
    # the network goes is named by its ISBN): wait for it before going offline
    expect(watched.title(isbn)).to_have_text(f"Live {isbn}", timeout=WAIT_MS)
    context.set_offline(True)
    expect(page.locator("#conn-state")).to_have_text("offline", timeout=WAIT_MS)
    expect(page.locator("#conn-detail")).to_have_text("waiting for the network")
    staff.restock(isbn, 2)  # happens while the browser is away
    context.set_offline(False)
    expect(page.locator("#conn-state")).to_have_text("live", timeout=WAIT_MS)
    # the restock is caught up, or comes live when the gateway itself had not heard of it yet
    expect(page.locator("#conn-detail")).to_contain_text("none missed", timeout=WAIT_MS)
    expect(watched.available(isbn)).to_have_text("5", timeout=WAIT_MS)
    expect(page.locator("#event-feed")).to_contain_text(f"Stock of “Live {isbn}”: 5 available (+2)")
    assert [e for e in watched.errors if e.startswith("pageerror")] == []


@in_chromium
def test_a_new_epoch_while_the_page_was_away_reloads_the_stock_and_says_so(browser, live_shop, contexts):
    staff = Client(live_shop)
    isbn = staff.new_book(stock=3)
    context = contexts()
    watched = Watched(context, live_shop).open()
    page = watched.page
    expect(watched.available(isbn)).to_have_text("3", timeout=WAIT_MS)
    epoch = watched.dashboard("epochs.inventory")
    live_shop.kill("gateway", signal.SIGTERM)
    expect(page.locator("#conn-state")).to_have_text(re.compile(r"reconnecting"), timeout=WAIT_MS)
    # a restored backup: the inventory's stream starts another history, whose seqs mean other events
    done = subprocess.run([sys.executable, RUN_PY, "new-epoch", "inventory"], env=live_shop.env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    staff.restock(isbn, 4, service="inventory")
    live_shop.start("gateway")
    expect(page.locator("#conn-detail")).to_contain_text("inventory reloaded (its history was reset)",
                                                         timeout=WAIT_MS)
    assert watched.dashboard("epochs.inventory") != epoch
    level = call("GET", f"{live_shop.api}/inventory/{isbn}")
    expect(watched.available(isbn)).to_have_text(str(level["available"]))
    assert level["available"] == 7
    assert [e for e in watched.errors if e.startswith("pageerror")] == []


def until(check, page, what: str):
    """Waits (polling through the page's own clock, up to WAIT_MS) for a test-side condition, e.g. a route
    handler having run; fails with ``what`` at the deadline."""
    for _ in range(WAIT_MS // 25):
        if check():
            return
        page.wait_for_timeout(25)
    raise AssertionError(f"not seen within {WAIT_MS} ms: {what}")


def reload_holding_the_refresh(page, held: list, later=lambda route: route.continue_()) -> None:
    """Reloads a signed-in page with its refresh (start() sends one at once) held in ``held[0]``; later
    refreshes are recorded there too and handled by ``later`` (they go through)."""
    def hold_the_first(route):
        held.append(route)
        if len(held) > 1:
            later(route)
    page.route("**/api/v1/tokens/refresh", hold_the_first)
    page.reload()
    until(lambda: held, page, "the refresh start() sends on a reload")


@in_chromium
def test_signing_out_while_a_refresh_is_in_flight_stays_signed_out(browser, live_shop, contexts):
    context = contexts()
    watched = Watched(context, live_shop).open().sign_in()
    page = watched.page
    held: list = []
    reload_holding_the_refresh(page, held)
    answer = held[0].fetch()  # the users service rotates the token now; the page has not heard yet
    assert answer.status == 200, answer.text()
    late_refresh_token = answer.json()["refresh_token"]
    page.click("#signout-button")
    expect(page.locator("#signin-form")).to_be_visible(timeout=WAIT_MS)
    # the late answer arrives: the page drops it and revokes the refresh token it carries
    with page.expect_request(lambda r: r.url.endswith("/tokens/revoke")
                             and late_refresh_token in (r.post_data or ""), timeout=WAIT_MS):
        held[0].fulfill(response=answer)
    expect(page.locator("#signin-form")).to_be_visible()
    expect(page.locator("#user-panel")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('bookshop.refresh')") is None
    assert watched.dashboard("subscriptions.orders") is None
    assert watched.dashboard("user") is None
    assert [e for e in watched.errors if e.startswith("pageerror")] == []


@in_chromium
def test_a_lost_refresh_answer_is_retried_soon_enough_not_to_look_like_a_stolen_token(browser, live_shop, contexts):
    context = contexts()
    watched = Watched(context, live_shop).open().sign_in()
    page = watched.page
    held: list = []
    reload_holding_the_refresh(page, held)
    lost = held[0].fetch()  # the server rotated the token, but the answer never reaches the page
    assert lost.status == 200, lost.text()
    lost_refresh_token = lost.json()["refresh_token"]
    held[0].abort()
    # the retry presents the same (now used) token inside the 10 s grace: refused quietly, so this page
    # asks to sign in again and the login is not ended as stolen
    expect(page.locator("#auth-error")).to_contain_text("Your session has ended", timeout=WAIT_MS)
    expect(page.locator("#signin-form")).to_be_visible()
    assert len(held) == 2, [r.request.url for r in held]
    # no theft alarm: the token of the lost answer still works (a reuse after the grace revokes the login)
    again = call("POST", live_shop.api + "/tokens/refresh", {"refresh_token": lost_refresh_token})
    call("POST", live_shop.api + "/tokens/revoke", {"refresh_token": again["refresh_token"]})


@in_chromium
def test_a_refresh_the_network_keeps_failing_gives_up_to_signed_out(browser, live_shop, contexts):
    context = contexts()
    watched = Watched(context, live_shop).open().sign_in()
    page = watched.page
    held: list = []
    reload_holding_the_refresh(page, held, later=lambda route: route.abort())  # the network is down
    held[0].abort()
    expect(page.locator("#auth-error")).to_contain_text("could not be renewed", timeout=WAIT_MS)
    expect(page.locator("#signin-form")).to_be_visible()
    assert len(held) == 2, "one retry, then signed out"
    assert page.evaluate("sessionStorage.getItem('bookshop.refresh')") is None

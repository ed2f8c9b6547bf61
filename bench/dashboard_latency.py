"""Event to pixels: how long after a change the dashboard shows it, in headless Chromium.

    python bench/dashboard_latency.py [--rounds 20]

Starts the shop's services (``run.py --service``, demo data off, an embedded database of the run's own),
opens the dashboard in headless Chromium (Debian's ``/usr/bin/chromium`` through PyPI ``playwright``) signed
in as staff, and per round:

- **restock → row**: a staff restock through the gateway; from just before the request to the moment a
  MutationObserver in the page sees the row's "available" cell show the new number;
- **order → tile**: a customer's checkout through the gateway; from just before ``POST /orders`` to the moment
  the "Orders confirmed" tile shows one more (the page re-reads GET /orders/summary on the order event);
- **order → feed**: the same order, until its sentence is in the feed.

Rounds are ``--pause`` seconds apart (default 1.2): the page reads today's totals at most once a second, so
back-to-back orders would measure that gap (up to 1 s) rather than the path; ``--pause 0`` shows it.

The clocks are the same machine's (``time.time()`` and the page's ``Date.now()``). Baseline, in the same
run: the round trip of the request alone (a restock answered; an order confirmed), so the page's own share is
``shown - answered``. Figures are printed as a table and as one JSON line; they are not pass/fail (the
browser tests in tests/e2e assert behaviour with generous deadlines, never these times).
"""
import _bootstrap  # noqa: F401  (must come first: takes bench/ off sys.path)

import argparse
import random
import sys
import time
import uuid

from bench import _common as c
from bookshop import SERVICES
from bookshop.services.isbn import isbn13_check_digit


# installed in the page with evaluate_handle(): a promise (in an object, or evaluate_handle would wait for it)
# that resolves with Date.now() when the element's text holds the wanted words
WATCH = """([selector, wanted]) => ({shown: new Promise((resolve) => {
  const done = () => { const node = document.querySelector(selector);
    if (node && node.textContent.includes(wanted)) { observer.disconnect(); resolve(Date.now()); return true; }
    return false; };
  const observer = new MutationObserver(done);
  observer.observe(document.body, {subtree: true, childList: true, characterData: true});
  done();
})})"""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="restocks and orders measured (default 20)")
    parser.add_argument("--pause", type=float, default=1.2, help="seconds between rounds (default 1.2)")
    return parser.parse_args(argv)


def early_isbn() -> str:
    """A new ISBN-13 near the start of the inventory snapshot (979000...)."""
    first12 = f"979000{random.randrange(10**6):06d}"
    return first12 + isbn13_check_digit(first12)


def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    if c.chromium_missing():
        return 2
    from playwright.sync_api import expect, sync_playwright
    with c.Bench("dashboard-latency") as bench:
        shop = c.Shop(bench, bench.database(), demo_data=False)
        shop.start(*SERVICES)
        staff = c.staff_token(shop)
        isbn = early_isbn()
        c.expect(c.call("POST", shop.api + "/books", {"isbn": isbn, "title": "Latency", "authors": ["A. Author"],
                                                      "category": "bench", "price_cents": 990,
                                                      "currency": "EUR"}, staff), 201)
        c.expect(c.call("POST", f"{shop.api}/inventory/{isbn}/restock", {"quantity": 10 * args.rounds}, staff), 200)
        email = f"bench-{uuid.uuid4().hex[:8]}@example.com"
        c.expect(c.call("POST", shop.api + "/users", {"email": email, "password": "password-123", "name": "B"}), 201)
        customer = c.expect(c.call("POST", shop.api + "/tokens", {"email": email, "password": "password-123"}),
                            200)["access_token"]
        rows = {"restock → row": [], "restock answered": [], "order → tile": [], "order → feed": [],
                "order answered": []}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=c.CHROMIUM,
                                        args=["--headless=new", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            c.sign_in_to_dashboard(page, shop)
            expect(page.locator("#tile-confirmed")).to_have_text("0", timeout=30000)
            cell = f'tr[data-isbn="{isbn}"] td[data-col="available"]'
            expect(page.locator(cell)).to_have_text(str(10 * args.rounds), timeout=30000)
            available = 10 * args.rounds
            for n in range(args.rounds):
                time.sleep(args.pause)  # a quiet shop between rounds (see --pause)
                available += 1
                shown = page.evaluate_handle(WATCH, [cell, str(available)])
                started = time.time()
                c.expect(c.call("POST", f"{shop.api}/inventory/{isbn}/restock", {"quantity": 1}, staff), 200)
                answered = time.time()
                at = page.evaluate("(w) => w.shown", shown) / 1000.0
                rows["restock → row"].append((at - started) * 1000)
                rows["restock answered"].append((answered - started) * 1000)

                tile = page.evaluate_handle(WATCH, ["#tile-confirmed", str(n + 1)])
                started = time.time()
                status, order = c.call("POST", shop.api + "/orders", {
                    "items": [{"isbn": isbn, "quantity": 1}], "shipping_address": c.ADDRESS, "payment": c.TEST_CARD},
                    customer, headers={"Idempotency-Key": uuid.uuid4().hex})
                answered = time.time()
                assert status == 201, order
                available -= 1
                feed = page.evaluate_handle(WATCH, ["#event-feed", order["id"][-6:] + " confirmed"])
                rows["order → tile"].append((page.evaluate("(w) => w.shown", tile) / 1000.0 - started) * 1000)
                rows["order → feed"].append((page.evaluate("(w) => w.shown", feed) / 1000.0 - started) * 1000)
                rows["order answered"].append((answered - started) * 1000)
                expect(page.locator(cell)).to_have_text(str(available), timeout=30000)
            browser.close()
        figures = {name: {"p50_ms": c.rnd(c.percentile(v, 50), 1), "p95_ms": c.rnd(c.percentile(v, 95), 1),
                          "max_ms": c.rnd(max(v), 1)} for name, v in rows.items()}
        c.table(f"event to pixels, {args.rounds} rounds (ms from just before the request)",
                ["path", "p50", "p95", "max"],
                [[name, f["p50_ms"], f["p95_ms"], f["max_ms"]] for name, f in figures.items()])
        c.note("page share = shown - answered: what the stream, the hub and the page add to the request itself")
        c.emit({"rounds": args.rounds, "pause_s": args.pause, **figures})
    return 0


if __name__ == "__main__":
    sys.exit(c.run_main(main))

"""docs/dashboard.png: the live dashboard of a running demo shop, as staff see it.

    python bench/dashboard_shot.py [--out docs/dashboard.png] [--width 1440] [--height 1100]

Starts the all-in-one shop as a user does (``python run.py``, demo catalogue and stock, a data directory of
the run's own), has a few customers shop for a minute or two (orders confirmed, one shipped, one cancelled, a
low title restocked), opens the dashboard in headless Chromium (Debian's ``/usr/bin/chromium`` through PyPI
``playwright``), signs in as staff, and writes the screenshot once the page is live and its tiles, chart and
feed have something to show. Nothing is timed here; see bench/dashboard_latency.py.
"""
import _bootstrap  # noqa: F401  (must come first: takes bench/ off sys.path)

import argparse
import os
import sys
import uuid

from bench import _common as c


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(c.ROOT, "docs", "dashboard.png"))
    parser.add_argument("--width", type=int, default=1440)
    parser.add_argument("--height", type=int, default=1100)
    parser.add_argument("--orders", type=int, default=9, help="orders the demo customers place (default 9)")
    return parser.parse_args(argv)


def shop_a_little(shop: c.RunPy, staff: str, orders: int) -> list[str]:
    """A few customers buy demo books; returns what the feed should show happening."""
    books = c.expect(c.call("GET", shop.api + "/books?limit=40"), 200)["items"]
    placed = []
    for n in range(orders):
        email = f"reader-{uuid.uuid4().hex[:8]}@example.com"
        account = {"email": email, "password": "password-123", "name": f"Reader {n + 1}"}
        c.expect(c.call("POST", shop.api + "/users", account), 201)
        login = {"email": email, "password": "password-123"}
        token = c.expect(c.call("POST", shop.api + "/tokens", login), 200)["access_token"]
        lines = [{"isbn": books[(n * 3 + k) % len(books)]["isbn"], "quantity": 1 + (n + k) % 2}
                 for k in range(1 + n % 3)]
        order = {"items": lines, "shipping_address": c.ADDRESS, "payment": c.TEST_CARD}
        status, body = c.call("POST", shop.api + "/orders", order, token,
                              headers={"Idempotency-Key": uuid.uuid4().hex})
        if status in (201, 202):
            placed.append(body["id"])
    if placed:
        c.expect(c.call("POST", f"{shop.api}/orders/{placed[0]}/ship", {}, staff), 200)
    if len(placed) > 1:
        c.expect(c.call("POST", f"{shop.api}/orders/{placed[1]}/cancel", {}, staff), 200)
    return placed


def main(argv=None) -> int:
    args = parse_args(argv if argv is not None else sys.argv[1:])
    if c.chromium_missing():
        return 2
    from playwright.sync_api import expect, sync_playwright
    with c.Bench("dashboard-shot") as bench:
        shop = c.RunPy(bench, demo_data=True).start()
        staff = c.staff_token(shop)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=c.CHROMIUM,
                                        args=["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"])
            page = browser.new_page(viewport={"width": args.width, "height": args.height}, color_scheme="light")
            c.sign_in_to_dashboard(page, shop)
            expect(page.locator("#tile-confirmed")).not_to_have_text("—", timeout=30000)
            placed = shop_a_little(shop, staff, args.orders)
            some = c.expect(c.call("GET", shop.api + "/books?limit=1"), 200)["items"]
            if some:
                c.expect(c.call("POST", f"{shop.api}/inventory/{some[0]['isbn']}/restock", {"quantity": 12}, staff),
                         200)
            if placed:
                expect(page.locator("#event-feed")).to_contain_text(placed[-1][-6:], timeout=30000)
            expect(page.locator("#chart-bars rect").first).to_be_visible(timeout=30000)
            page.evaluate("document.activeElement && document.activeElement.blur()")
            page.wait_for_timeout(2000)  # a picture, not a test: the last flashes fade first
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            page.screenshot(path=args.out, full_page=False)
            browser.close()
        print(f"wrote {args.out} ({len(placed)} orders placed by demo customers)")
    return 0


if __name__ == "__main__":
    sys.exit(c.run_main(main))

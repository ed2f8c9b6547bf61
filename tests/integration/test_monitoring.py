"""The operator's files in deploy/monitoring/: alert rules that promtool accepts and whose unit tests pass, and a
Grafana dashboard over series a running shop really exports (once exercised: labelled series appear when used)."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import uuid

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bookshop import SERVICES
from client import ADDRESS, CARD, Api

MONITORING = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "deploy", "monitoring")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: install it (Debian: apt-get install prometheus) to check the "
                             "alert rules")

SELECTOR = re.compile(r"\b(bookshop_[a-z_]+)(\{[^}]*\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
WORDS = re.compile(r"^[\w-]+(\|[\w-]+)*$")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=MONITORING, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_alert_rules_are_valid():
    done = promtool("check", "rules", "alerts.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout


@needs_promtool
def test_each_alert_fires_above_its_bar_and_not_below():
    done = promtool("test", "rules", "alerts.test.yaml")
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_the_prometheus_configuration_is_valid():
    done = promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test():
    with open(os.path.join(MONITORING, "alerts.yaml")) as fh:
        alerts = set(re.findall(r"^\s*- alert: (\w+)", fh.read(), re.M))
    with open(os.path.join(MONITORING, "alerts.test.yaml")) as fh:
        tested = set(re.findall(r"alertname: (\w+)", fh.read()))
    assert len(alerts) == 8 and alerts == tested


def dashboard_queries() -> list[str]:
    with open(os.path.join(MONITORING, "grafana-dashboard.json")) as fh:
        board = json.load(fh)
    queries = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    queries += [v["query"]["query"] for v in board["templating"]["list"] if isinstance(v.get("query"), dict)]
    return queries


def wanted_series(queries: list[str]) -> set[tuple[str, frozenset]]:
    """(metric, label pairs) every query needs to exist: its name, and each of its exact label values
    (an alternation of plain words counts as each of its words)."""
    wanted = set()
    for query in queries:
        for name, labels in SELECTOR.findall(query):
            exact, alternatives = {}, {}
            for label, op, value in MATCHER.findall(labels):
                if op == "=":
                    exact[label] = value
                elif op == "=~" and WORDS.match(value) and "$" not in value:
                    alternatives[label] = value.split("|")
            wanted.add((name, frozenset(exact.items())))
            for label, values in alternatives.items():
                wanted |= {(name, frozenset({**exact, label: v}.items())) for v in values}
    return wanted


async def exercise(shop) -> None:
    """What a day in the shop does: accounts, a failed login, books and stock, the book page, a confirmed and a
    declined checkout, a live-stream client."""
    async with aiohttp.ClientSession() as session:
        api = Api(shop, session)
        staff, customer = await asyncio.gather(api.staff(), api.customer())
        r = await api.post("/tokens", {"email": "nobody-" + uuid.uuid4().hex + "@example.com", "password": "x" * 10},
                           token=None)
        assert r.status == 401, r
        isbn = await api.new_book(staff, stock=5)
        assert (await api.get(f"/books/{isbn}")).status == 200
        body = {"items": [{"isbn": isbn, "quantity": 1}], "shipping_address": ADDRESS}
        r = await customer.post("/orders", {**body, "payment": CARD}, headers={"Idempotency-Key": uuid.uuid4().hex})
        assert r.status == 201, r
        declined = {**CARD, "card_number": "4000000000000002"}
        r = await customer.post("/orders", {**body, "payment": declined}, headers={"Idempotency-Key": uuid.uuid4().hex})
        assert r.status == 402, r
        async with session.ws_connect(shop.ws_url, headers={"Origin": shop.origin}) as ws:
            await ws.send_json({"op": "subscribe", "channel": "inventory"})
            await ws.receive(timeout=10)


async def scraped(shop) -> set[tuple[str, frozenset]]:
    series = set()
    async with aiohttp.ClientSession() as session:
        for service in SERVICES:
            async with session.get(shop.url(service) + "/metrics") as resp:
                text = await resp.text()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    series.add((sample.name, frozenset(sample.labels.items())))
    return series


@pytest.fixture(scope="module")
def exported(shop) -> set[tuple[str, frozenset]]:
    """Every series the shop's services export once it has been exercised."""
    async def run():
        await exercise(shop)
        return await scraped(shop)
    # a private loop, closed here: asyncio.run would also reset the global loop under pytest-tornado's feet
    # (whose dropped loop then surfaces as an unclosed-socket warning in whichever test runs next)
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()


def missing_from(exported: set, wanted: set) -> list:
    def exists(name: str, labels: frozenset) -> bool:
        return any(n == name and labels <= got for n, got in exported)
    return sorted((name, dict(labels)) for name, labels in wanted if not exists(name, labels))


def test_the_dashboard_uses_only_series_the_services_export(exported):
    wanted = wanted_series(dashboard_queries())
    assert len({name for name, _ in wanted}) >= 6  # the parser found the queries' metrics
    missing = missing_from(exported, wanted)
    assert not missing, f"the dashboard asks for series no service exports: {missing}"


def test_the_alert_rules_watch_only_series_the_services_export(exported):
    with open(os.path.join(MONITORING, "alerts.yaml")) as fh:
        wanted = wanted_series([fh.read()])
    assert len({name for name, _ in wanted}) >= 5
    missing = missing_from(exported, wanted)
    assert not missing, f"the alerts watch series no service exports: {missing}"

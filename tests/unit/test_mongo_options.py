"""The options every service's MongoDB client gets unless its URI chose otherwise."""
from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from bookshop.storage.mongo import Database, with_required_options


def options(uri: str) -> dict:
    return dict(parse_qsl(urlsplit(with_required_options(uri)).query))


def test_journaled_unretried_writes_and_a_polling_monitor_by_default():
    assert options("mongodb://127.0.0.1:27017/") == {
        "retryWrites": "false", "journal": "true", "serverMonitoringMode": "poll"}


def test_what_the_uri_chose_is_kept():
    found = options("mongodb://h1,h2/?replicaSet=rs&serverMonitoringMode=stream&journal=false")
    assert found == {"replicaSet": "rs", "serverMonitoringMode": "stream", "journal": "false",
                     "retryWrites": "false"}


def test_the_client_polls_instead_of_streaming():
    # a streaming monitor keeps a hello waiting on the server: the embedded one wakes 4 times a second for it
    database = Database("mongodb://127.0.0.1:9/", "shop", server_selection_ms=10)
    try:
        assert database.client.delegate.options.server_monitoring_mode == "poll"
    finally:
        database.client.close()

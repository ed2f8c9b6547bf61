"""Who may read which live channel, and which client frames the hub accepts (pure rules, no I/O)."""
from __future__ import annotations

import json

import pytest

from bookshop.auth import Principal
from bookshop.ws.channels import CHANNELS, ChannelError, Filter, authorize, parse_message, private

CUSTOMER = Principal(sub="u-ann", role="customer", exp=2**31)
OTHER = Principal(sub="u-bob", role="customer", exp=2**31)
STAFF = Principal(sub="u-staff", role="staff", exp=2**31)
SERVICE = Principal(sub="svc-orders", role="service", exp=2**31)


def refused(channel, principal) -> str:
    with pytest.raises(ChannelError) as info:
        authorize(channel, principal)
    return info.value.code


@pytest.mark.parametrize("channel", ["inventory", "books"])
@pytest.mark.parametrize("principal", [None, CUSTOMER, STAFF, SERVICE])
def test_public_channels_are_open_to_everyone_unfiltered(channel, principal):
    assert authorize(channel, principal) == Filter()
    assert not private(channel)


def test_every_order_is_for_staff_only():
    assert authorize("orders", STAFF) == Filter()
    assert refused("orders", None) == "forbidden"
    assert refused("orders", CUSTOMER) == "forbidden"
    assert refused("orders", SERVICE) == "forbidden"
    assert private("orders")


def test_my_orders_are_filtered_to_the_signed_in_user():
    assert authorize("orders:mine", CUSTOMER) == Filter(user_id="u-ann")
    assert authorize("orders:mine", STAFF) == Filter(user_id="u-staff")
    assert refused("orders:mine", None) == "forbidden"
    assert refused("orders:mine", SERVICE) == "forbidden"
    assert private("orders:mine")


@pytest.mark.parametrize("channel", ["", "Inventory", "orders:all", "orders:mine:u-bob", "users", "events"])
def test_unknown_channels_are_refused_by_name(channel):
    assert refused(channel, STAFF) == "unknown_channel"
    assert channel not in CHANNELS


def test_filter_matches_only_the_owners_events():
    mine = authorize("orders:mine", CUSTOMER)
    assert mine.matches({"seq": 1, "user_id": "u-ann"})
    assert not mine.matches({"seq": 2, "user_id": "u-bob"})
    assert not mine.matches({"seq": 3})  # an event without an owner is nobody's
    assert Filter().matches({"seq": 4, "user_id": "u-bob"})
    assert Filter().matches({"seq": 5})


@pytest.mark.parametrize("frame, wanted", [
    ('{"op": "auth", "token": "abc"}', {"op": "auth", "token": "abc"}),
    ('{"op": "subscribe", "channel": "inventory"}', {"op": "subscribe", "channel": "inventory"}),
    ('{"op": "subscribe", "channel": "books", "after": 0}', {"op": "subscribe", "channel": "books", "after": 0}),
    ('{"op": "subscribe", "channel": "books", "after": 12345678901}',
     {"op": "subscribe", "channel": "books", "after": 12345678901}),
    ('{"op": "subscribe", "channel": "books", "after": null}',
     {"op": "subscribe", "channel": "books", "after": None}),
    ('{"op": "unsubscribe", "channel": "orders"}', {"op": "unsubscribe", "channel": "orders"}),
])
def test_well_formed_frames_are_accepted_as_sent(frame, wanted):
    assert parse_message(frame) == wanted


@pytest.mark.parametrize("frame, words", [
    ("", "not JSON"),
    ("subscribe inventory", "not JSON"),
    ('{"op": "subscribe", "channel": "inventory"', "not JSON"),
    ("[1, 2]", "'op'"),
    ('"subscribe"', "'op'"),
    ("null", "'op'"),
    ("{}", "'op'"),
    ('{"op": 7}', "'op'"),
    ('{"op": "publish", "channel": "inventory"}', "unknown op 'publish'"),
    ('{"op": "SUBSCRIBE", "channel": "inventory"}', "unknown op"),
    ('{"op": "auth"}', "token"),
    ('{"op": "auth", "token": 12}', "token"),
    ('{"op": "auth", "token": "t", "role": "staff"}', "unknown field 'role'"),
    ('{"op": "subscribe"}', "channel"),
    ('{"op": "subscribe", "channel": ["inventory"]}', "channel"),
    ('{"op": "subscribe", "channel": "inventory", "after": -1}', "after"),
    ('{"op": "subscribe", "channel": "inventory", "after": "5"}', "after"),
    ('{"op": "subscribe", "channel": "inventory", "after": 1.5}', "after"),
    ('{"op": "subscribe", "channel": "inventory", "after": true}', "after"),
    ('{"op": "subscribe", "channel": "inventory", "after": {"$gt": 0}}', "after"),
    ('{"op": "subscribe", "channel": "inventory", "from": 3}', "unknown field 'from'"),
    ('{"op": "unsubscribe"}', "channel"),
    ('{"op": "unsubscribe", "channel": "books", "after": 3}', "unknown field 'after'"),
])
def test_bad_frames_are_refused_with_a_reason(frame, words):
    with pytest.raises(ChannelError) as info:
        parse_message(frame)
    assert info.value.code == "bad_message"
    assert words in info.value.message


def test_binary_frames_are_refused_even_when_they_hold_json():
    with pytest.raises(ChannelError) as info:
        parse_message(json.dumps({"op": "subscribe", "channel": "inventory"}).encode())
    assert info.value.code == "bad_message"
    assert "text" in info.value.message

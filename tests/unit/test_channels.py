"""Who may read which live channel, and which client frames the hub accepts (pure rules, no I/O)."""
from __future__ import annotations

import json

import pytest

from bookshop.auth import Principal
from bookshop.ws.channels import (CHANNELS, ChannelError, Filter, MessageBudget, authorize, check_known, parse_message,
                                  private)

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
    with pytest.raises(ChannelError) as info:
        check_known(channel)  # what an unsubscribe of it hears
    assert info.value.code == "unknown_channel" and repr(channel) in info.value.message


@pytest.mark.parametrize("channel", sorted(CHANNELS))
def test_every_channel_is_known(channel):
    check_known(channel)


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
    ('{"op": "subscribe", "channel": "books", "after": 3, "epoch": "3f9c0a1b2d4e5f60"}',
     {"op": "subscribe", "channel": "books", "after": 3, "epoch": "3f9c0a1b2d4e5f60"}),
    ('{"op": "subscribe", "channel": "books", "after": 3, "epoch": null}',
     {"op": "subscribe", "channel": "books", "after": 3, "epoch": None}),
])
def test_well_formed_frames_are_accepted_as_sent(frame, wanted):
    assert parse_message(frame) == wanted


@pytest.mark.parametrize("frame, words", [
    ("", "malformed JSON"),
    ("subscribe inventory", "malformed JSON"),
    ('{"op": "subscribe", "channel": "inventory"', "malformed JSON"),
    ('{"op": "subscribe", "channel": "inventory", "after": NaN}', "malformed JSON"),
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
    ('{"op": "subscribe", "channel": "inventory", "after": 3, "epoch": 7}', "epoch"),
    ('{"op": "subscribe", "channel": "inventory", "after": 3, "epoch": ""}', "epoch"),
    ('{"op": "subscribe", "channel": "inventory", "after": 3, "epoch": "%s"}' % ("x" * 65), "epoch"),
    ('{"op": "subscribe", "channel": "inventory", "after": 3, "epoch": {"$ne": ""}}', "epoch"),
    ('{"op": "subscribe", "channel": "inventory", "after": 3, "epoch": "a b"}', "epoch"),
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


def nested(depth: int) -> str:
    """A subscribe whose ``after`` is ``depth - 1`` arrays deep (the frame itself is level 1)."""
    return '{"op": "subscribe", "channel": "inventory", "after": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


@pytest.mark.parametrize("frame", [nested(33), "[" * 30_000 + "]" * 30_000, '{"a":' * 10_000 + "1" + "}" * 10_000])
def test_frames_nested_deeper_than_32_levels_are_bad_messages(frame):
    assert len(frame) <= 64 * 1024  # what the gateway lets through
    with pytest.raises(ChannelError) as info:
        parse_message(frame)
    assert info.value.code == "bad_message"
    assert "32 levels" in info.value.message


def test_32_levels_are_still_parsed():
    with pytest.raises(ChannelError) as info:
        parse_message(nested(32))
    assert info.value.code == "bad_message" and "after must be" in info.value.message  # parsed, then judged


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_200_messages_is_allowed_and_the_201st_is_not():
    clock = Clock()
    budget = MessageBudget(clock=clock)
    assert all(budget.take() for _ in range(200))
    assert not budget.take()
    assert not budget.take()  # a refused message costs nothing more, and earns nothing


def test_the_budget_refills_at_20_messages_a_second_up_to_the_burst():
    clock = Clock()
    budget = MessageBudget(clock=clock)
    for _ in range(200):
        budget.take()
    clock.now += 1.0
    assert sum(budget.take() for _ in range(100)) == 20
    clock.now += 3600.0  # a long quiet spell earns no more than one burst
    assert sum(budget.take() for _ in range(1000)) == 200


def test_a_steady_20_messages_a_second_is_never_refused_but_a_steady_25_is():
    clock = Clock()
    steady = MessageBudget(clock=clock)
    for _ in range(20 * 600):  # ten minutes at 20/s
        clock.now += 1 / 20
        assert steady.take()
    fast = MessageBudget(clock=clock)
    sent = 0
    while fast.take():
        clock.now += 1 / 25
        sent += 1
        assert sent < 10_000
    assert 900 < sent < 1100  # the burst of 200 lasts 200 / (25 - 20) = 40 s at 25/s

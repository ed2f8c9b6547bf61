"""Each service's collaborators are one frozen dataclass (bookshop/deps.py), read as attributes."""
from __future__ import annotations

import dataclasses
import inspect

import pytest

from bookshop import deps, wiring


def test_every_service_builder_returns_its_own_dependencies_class():
    for name, builder in wiring.BUILDERS.items():
        returned = inspect.signature(builder).return_annotation
        cls = {"users": deps.UsersDeps, "catalog": deps.CatalogDeps, "inventory": deps.InventoryDeps,
               "orders": deps.OrdersDeps, "payments": deps.PaymentsDeps,
               "recommendations": deps.RecommendationsDeps, "gateway": deps.GatewayDeps}[name]
        assert cls.__name__ in str(returned), name
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen


def test_dependencies_cannot_be_replaced_after_wiring():
    d = deps.PaymentsDeps(charges=object(), refund_payment=object())
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.charges = object()


def test_the_gateway_finds_an_upstream_by_the_route_tables_owner_name():
    clients = {name: object() for name in deps.UPSTREAMS}
    upstreams = deps.Upstreams(**clients)
    for name, client in clients.items():
        assert upstreams.owner(name) is client
    with pytest.raises(KeyError):
        upstreams.owner("owner")  # a method's name is not a service

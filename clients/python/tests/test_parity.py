"""The async and the sync client offer the same calls with the same parameters."""

from __future__ import annotations

import inspect
from typing import Any

import ai_credits_client
from ai_credits_client import AsyncHold, CreditsClient, SyncCreditsClient, SyncHold

#: The only names that differ, by the conventions of asyncio and httpx.
ASYNC_ONLY = {"aclose", "__aenter__", "__aexit__"}
SYNC_ONLY = {"close", "__enter__", "__exit__"}


def public(cls: type) -> dict[str, Any]:
    return {
        name: member
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and (callable(member) or isinstance(member, property))
    }


def parameters(function: Any) -> list[tuple[str, Any, Any, Any]]:
    signature = inspect.signature(function)
    return [(p.name, p.kind, p.default, p.annotation) for p in signature.parameters.values()]


def test_both_clients_have_the_same_public_methods() -> None:
    async_names = set(public(CreditsClient)) - ASYNC_ONLY
    sync_names = set(public(SyncCreditsClient)) - SYNC_ONLY
    assert async_names == sync_names
    assert {
        "features",
        "reserve",
        "get_reservation",
        "commit",
        "refund",
        "extend",
        "usage",
        "events",
        "grant",
        "grants",
        "set_allowance",
        "delete_allowance",
        "hold",
    } <= async_names


def test_each_method_takes_the_same_parameters_in_both_clients() -> None:
    for name, method in public(CreditsClient).items():
        if name in ASYNC_ONLY:
            continue
        twin = getattr(SyncCreditsClient, name)
        assert parameters(method) == parameters(twin), name
        if name == "hold":
            assert inspect.isasyncgenfunction(inspect.unwrap(method))
            assert inspect.isgeneratorfunction(inspect.unwrap(twin))
        else:
            assert inspect.iscoroutinefunction(method), name
            assert not inspect.iscoroutinefunction(twin), name
    assert parameters(CreditsClient.__init__)[:-1] == parameters(SyncCreditsClient.__init__)[:-1]


def test_both_holds_offer_the_same_surface() -> None:
    assert public(AsyncHold).keys() == public(SyncHold).keys()
    assert inspect.iscoroutinefunction(AsyncHold.refund)
    assert not inspect.iscoroutinefunction(SyncHold.refund)
    assert parameters(AsyncHold.refund) == parameters(SyncHold.refund)


def test_the_package_exports_what_it_lists() -> None:
    for name in ai_credits_client.__all__:
        assert hasattr(ai_credits_client, name), name

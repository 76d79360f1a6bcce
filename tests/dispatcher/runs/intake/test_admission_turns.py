"""Admission's turns: a workspace's messages are admitted a few at a time, others' are not
held up by them, and the map forgets a workspace once nobody holds or waits."""

from __future__ import annotations

import asyncio

import pytest

from switchboard.dispatcher.runs.intake.admission import Turns

pytestmark = pytest.mark.unit


async def test_a_workspace_holds_at_most_its_limit_and_others_pass() -> None:
    turns = Turns(2)
    release = asyncio.Event()
    inside: list[str] = []

    async def hold(workspace: str, tag: str) -> None:
        async with turns.held(workspace):
            inside.append(tag)
            await release.wait()

    flood = [asyncio.create_task(hold("a", f"a{i}")) for i in range(5)]
    other = asyncio.create_task(hold("b", "b0"))
    for _ in range(5):
        await asyncio.sleep(0)  # let every task reach the gate
    # Two of A's inside, three waiting; B went straight in past them.
    assert sorted(inside) == ["a0", "a1", "b0"]
    assert turns.holders("a") == 5
    release.set()
    await asyncio.gather(*flood, other)
    assert inside[3:] == ["a2", "a3", "a4"]  # A's waiters in their order
    assert turns.holders("a") == turns.holders("b") == 0


async def test_a_waiter_that_gives_up_leaves_no_trace() -> None:
    turns = Turns(1)
    release = asyncio.Event()

    async def hold() -> None:
        async with turns.held("a"):
            await release.wait()

    first = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0)
    assert turns.holders("a") == 2
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert turns.holders("a") == 1
    release.set()
    await first
    assert turns.holders("a") == 0

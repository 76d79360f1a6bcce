"""Memory forming across SIGKILLs (issue 82, "Durable"): a `switchboard serve` replica on
PostgreSQL and Redis, killed again and again while it forms four exchanges, and started
again as the same replica each time.

The scripted model answers four facts per exchange and an ADD for each. Each time it is
asked for decisions, the replica is killed a moment later (0 to 80 ms: before the answer
is read, between the answer and the stored plan, or while a plan is applied; the four
jobs are worked on side by side, each at its own point) and started again; the claims
lapse and the jobs are retaken, a stored plan applied from where it stopped, a missing
one asked for again. The first kill comes right after the last run ended, before
anything was formed (a job must be written with the feeder's cursor, or its exchange is
lost). At the end every fact is remembered exactly once: none applied twice, none lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

import pytest
from grpc import aio
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.platform.store.models import MemoryJobRow
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import scaled_env
from tests.e2e.replicas import Replica, sign_up
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.infra.redis import RedisServer
from tests.kits.contextkit import context_stub, create_conversation, create_workspace
from tests.kits.dispatchkit import request, send, watch_all

# A hang guard: about 30 s alone, several times that on a loaded two-core machine.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

#: Rounds of exchanges, and kills while a round's exchanges are formed at most (after the
#: first, right after its runs).
ROUNDS: Final = 2
KILLS: Final = 8
EXCHANGES: Final = 4
FACTS: Final = ("Lives in Porto", "Has two cats", "Prefers short answers", "Rides a bike")
SETTLE_S: Final = 120.0


@pytest.fixture
def env(tmp_path: Path, postgres_url: str, redis_server: RedisServer) -> dict[str, str]:
    return {
        **scaled_env(tmp_path, postgres_url, redis_server.url),
        "SWITCHBOARD_MEMORY_FORMING": "true",
        "SWITCHBOARD_MEMORY_CLAIM_S": "3",
        "SWITCHBOARD_MEMORY_LEASE_S": "2",
        "SWITCHBOARD_MEMORY_POLL_S": "0.2",
        "SWITCHBOARD_MEMORY_CONSOLIDATE_DELAY_S": "3600",
        "PYTHONFAULTHANDLER": "1",
    }


class Script:
    """The model: "Noted." for a run; the four facts; an ADD for each, counted."""

    def __init__(self) -> None:
        self.decisions = 0
        self.asked = asyncio.Event()
        #: The facts are answered once this is set (nothing is formed before).
        self.open = asyncio.Event()

    def __call__(self, body: dict[str, Any]) -> Reply:
        asked = body.get("response_format")
        if not asked:
            return Reply.text("Noted.")
        content = json.loads(body["messages"][-1]["content"])
        if asked["json_schema"]["name"] == "memory_candidates":
            said = next(t["text"] for t in content["exchange"] if t["role"] == "user")
            facts = [
                {
                    "category": "person_fact",
                    "content": f"{fact} ({said})",
                    "confidence": 0.9,
                    "valid_from": None,
                }
                for fact in FACTS
            ]
            return dataclasses.replace(Reply.text(json.dumps({"facts": facts})), gate=self.open)
        self.decisions += 1
        self.asked.set()
        decisions = [
            {"candidate": c["candidate"], "action": "add", "target": None, "reason": "new"}
            for c in content["candidates"]
        ]
        return Reply.text(json.dumps({"decisions": decisions}))


@contextlib.asynccontextmanager
async def replica(env: dict[str, str]) -> AsyncIterator[Replica]:
    with contextlib.ExitStack() as stack:
        one = Replica("memory-forming", env, stack)
        await one.start()
        try:
            yield one
        finally:
            await one.close()


async def _jobs(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int(
            await connection.scalar(
                select(func.count())
                .select_from(MemoryJobRow)
                .where(MemoryJobRow.kind == "exchange")
            )
            or 0
        )


async def _settled(engine: AsyncEngine, done: Callable[[int], bool], what: str) -> None:
    deadline = time.monotonic() + SETTLE_S
    while not done(await _jobs(engine)):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)  # polling the job table, under a deadline


async def _formed(engine: AsyncEngine, script: Script, asked: int) -> bool:
    """Wait for the next decision request (True) or the exchange's job gone (False)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        if script.decisions > asked:
            return True
        if not await _jobs(engine):
            return False
        assert time.monotonic() < deadline, "forming never went on after the restart"
        script.asked.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.2):  # the job table is read between waits
                await script.asked.wait()


async def test_forming_killed_again_and_again_applies_each_decision_once(
    env: dict[str, str], postgres_engine: AsyncEngine
) -> None:
    script = Script()
    rng = random.Random(82)  # noqa: S311 - a test's timing, not security
    async with FakeOpenAI(default=script) as fake:
        env = {**env, "SWITCHBOARD_LLM_BASE_URL": fake.url, "SWITCHBOARD_LLM_MODEL": "m-1"}
        async with replica(env) as owner:
            assert owner.process is not None
            caller = await sign_up(owner.process.address, "forming")
            assert owner.channel is not None
            contexts = context_stub(owner.channel)
            workspace = (await create_workspace(contexts, caller, "Memory")).name
            conversation = (await create_conversation(contexts, caller, workspace)).name
            created = await owner.stub.CreateAssistant(
                pb.CreateAssistantRequest(
                    parent=workspace,
                    assistant=pb.Assistant(
                        display_name="Keeper",
                        memory_policy=cpb.MemoryPolicy(mode=cpb.MEMORY_FORMING_MODE_USER),
                    ),
                ),
                metadata=caller.md,
                timeout=CALL_DEADLINE_S,
            )
            runs: list[str] = []
            kills = 0
            for _ in range(ROUNDS):
                script.open.clear()
                for _ in range(EXCHANGES):
                    said = request(conversation, f"exchange {len(runs)}")
                    said.assistant = created.assistant.name
                    sent = await send(owner.stub, caller, said)
                    run = (await watch_all(owner.stub, caller, sent.run.name)).final
                    assert run.state == pb.RUN_STATE_SUCCEEDED
                    runs.append(run.name)
                # Before anything was formed (maybe before the feeder read the runs' ends).
                owner.kill()
                await owner.start()
                kills += 1
                await _settled(postgres_engine, lambda jobs: jobs == EXCHANGES, "the jobs written")
                script.open.set()
                for _ in range(KILLS):
                    if not await _formed(postgres_engine, script, script.decisions):
                        break
                    await asyncio.sleep(rng.uniform(0.0, 0.08))  # where in forming it dies
                    owner.kill()
                    await owner.start()
                    kills += 1
                await _settled(postgres_engine, lambda jobs: jobs == 0, "the exchanges formed")
            assert owner.channel is not None
            async with aio.insecure_channel(owner.process.address) as channel:
                listed = await context_stub(channel).ListMemoryItems(
                    cpb.ListMemoryItemsRequest(
                        parent=caller.name, workspace=workspace, page_size=100
                    ),
                    metadata=caller.md,
                    timeout=CALL_DEADLINE_S,
                )
    contents = sorted(item.content for item in listed.memory_items)
    expected = [f"{fact} (exchange {index})" for index in range(len(runs)) for fact in FACTS]
    assert contents == sorted(expected)  # each once: none twice, none lost
    assert {item.formation.run for item in listed.memory_items} == set(runs)
    assert kills >= 2 * ROUNDS

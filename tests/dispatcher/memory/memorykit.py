"""The kit of memory forming's service tests: the scripted model, the events tap, and
the few calls every test makes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from grpc import aio
from sqlalchemy import select

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.store.models import MemoryJobRow
from tests.conftest import CALL_DEADLINE_S, make_settings, started
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.kits.contextkit import Caller, Stub, World, ctx_world
from tests.kits.dispatchkit import Stub as DStub
from tests.kits.dispatchkit import dispatcher_stub, request, send, watch_all

USER_AND_WORKSPACE = cpb.MemoryPolicy(mode=cpb.MEMORY_FORMING_MODE_USER_AND_WORKSPACE)
_DECIDED = events_pb2.EVENT_TYPE_MEMORY_DECIDED


@dataclass
class Model:
    """The scripted model: a run's call is answered "Noted."; forming's extraction by
    the facts scripted for the exchange's last user text (a list of answers, one per
    call, the last repeated), its decisions by ``decisions`` (candidate text ->
    (action, the content of the item it targets))."""

    facts: dict[str, list[Any]] = field(default_factory=dict)
    decisions: dict[str, tuple[str, str]] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)
    #: A run's answer by its assistant's instructions (the system message); else "Noted.".
    runs: dict[str, Callable[[dict[str, Any]], Reply]] = field(default_factory=dict)
    #: The exchanges' user texts forming asked about.
    exchanges: list[str] = field(default_factory=list)

    def __call__(self, body: dict[str, Any]) -> Reply:
        asked = body.get("response_format")
        if not asked:
            first = body["messages"][0]
            rule = self.runs.get(first["content"]) if first["role"] == "system" else None
            return rule(body) if rule is not None else Reply.text("Noted.", usage=(20, 2))
        name = asked["json_schema"]["name"]
        self.asked.append(name)
        content = json.loads(body["messages"][-1]["content"])
        if name == "memory_candidates":
            said = [turn["text"] for turn in content["exchange"] if turn["role"] == "user"][-1]
            self.exchanges.append(said)
            answers = self.facts.get(said, [[]])
            answer = answers.pop(0) if len(answers) > 1 else answers[0]
            text = answer if isinstance(answer, str) else json.dumps({"facts": answer})
            return Reply.text(text, usage=(300, 40))
        decisions = []
        for candidate in content["candidates"]:
            action, about = self.decisions.get(candidate["content"], ("add", ""))
            target = next(
                (e["handle"] for e in candidate["existing"] if e["content"] == about), None
            )
            decisions.append(
                {
                    "candidate": candidate["candidate"],
                    "action": action if target or action in ("add", "none") else "add",
                    "target": target,
                    "reason": f"{action} by script",
                }
            )
        return Reply.text(json.dumps({"decisions": decisions}), usage=(300, 40))


def fact(content: str, category: str = "person_fact") -> dict[str, Any]:
    return {"category": category, "content": content, "confidence": 0.8, "valid_from": None}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def model_fixture() -> AsyncIterator[tuple[FakeOpenAI, Model]]:
    script = Model()
    async with FakeOpenAI(default=script) as fake:
        yield fake, script


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh_fixture(
    module_database_url: str, model: tuple[FakeOpenAI, Model]
) -> AsyncIterator[SwitchboardServer]:
    settings = make_settings(
        database_url=module_database_url,
        instance_id="test-memory",
        llm_base_url=model[0].url,
        llm_model="m-1",
        llm_prices=json.dumps({"m-1": {"input_per_mtok": 1.0, "output_per_mtok": 1.0}}),
        llm_max_output_tokens=64,
        llm_max_retries=0,
        memory_forming=True,
        memory_poll_s=0.2,
        memory_lease_s=3.0,
        memory_max_output_tokens=4000,
        memory_consolidate_delay_s=3600.0,
        memory_paused_retry_s=3600.0,
    )
    async with started(settings) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module")
async def world_fixture(mesh: SwitchboardServer, stub: Stub) -> World:
    return await ctx_world(mesh, stub)


@pytest.fixture
def dstub_fixture(channel: aio.Channel) -> DStub:
    return dispatcher_stub(channel)


class Decided:
    """The MEMORY_DECIDED events the server publishes while attached."""

    def __init__(self, mesh: SwitchboardServer) -> None:
        self.events: list[events_pb2.Event] = []
        self._changed = asyncio.Event()
        self._stop = mesh.shared.bus.listen(self._on)

    def _on(self, event: events_pb2.Event) -> None:
        if event.type == _DECIDED:
            self.events.append(event)
            self._changed.set()

    def of(self, run: str) -> list[events_pb2.MemoryDecided]:
        return [e.memory_decided for e in self.events if e.memory_decided.run == run]

    async def wait(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(CALL_DEADLINE_S):
            while not done():
                self._changed.clear()
                await self._changed.wait()

    async def count(self, run: str, count: int) -> None:
        await self.wait(lambda: len(self.of(run)) >= count)

    def close(self) -> None:
        self._stop()


@pytest.fixture
def decided_fixture(mesh: SwitchboardServer) -> Iterator[Decided]:
    tap = Decided(mesh)
    yield tap
    tap.close()


async def assistant(
    dstub: DStub,
    world: World,
    policy: cpb.MemoryPolicy,
    *,
    instructions: str = "",
    delegates: tuple[str, ...] = (),
) -> str:
    """A new assistant of ``world`` with ``policy``; its name."""
    response = await dstub.CreateAssistant(
        pb.CreateAssistantRequest(
            parent=world.name,
            assistant=pb.Assistant(
                display_name="Keeper",
                instructions=instructions,
                memory_policy=policy,
                delegates=[pb.AssistantDelegate(assistant=d) for d in delegates],
            ),
        ),
        metadata=world.owner.md,
        timeout=CALL_DEADLINE_S,
    )
    return response.assistant.name


async def told(dstub: DStub, caller: Caller, conversation: str, keeper: str, text: str) -> pb.Run:
    """Say ``text`` to ``keeper``; the run, finished."""
    sent_request = request(conversation, text)
    sent_request.assistant = keeper
    sent = await send(dstub, caller, sent_request)
    seen = await watch_all(dstub, caller, sent.run.name)
    assert seen.final.state == pb.RUN_STATE_SUCCEEDED
    return seen.final


async def items(
    stub: Stub,
    caller: Caller,
    parent: str,
    workspace: str = "",
    validity: cpb.MemoryValidity.ValueType = cpb.MEMORY_VALIDITY_UNSPECIFIED,
) -> list[cpb.MemoryItem]:
    response = await stub.ListMemoryItems(
        cpb.ListMemoryItemsRequest(
            parent=parent, workspace=workspace, validity=validity, page_size=100
        ),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    return list(response.memory_items)


async def pending(mesh: SwitchboardServer, workspace_id: str) -> list[tuple[str, str]]:
    """``(id, state)`` of a workspace's forming jobs, as stored."""

    def read(db: Any) -> list[tuple[str, str]]:
        rows = db.execute(
            select(MemoryJobRow.id, MemoryJobRow.state)
            .where(MemoryJobRow.workspace_id == workspace_id)
            .order_by(MemoryJobRow.id)
        )
        return [(row.id, row.state) for row in rows]

    result: list[tuple[str, str]] = await mesh.shared.database.run(read, write=False)
    return result

"""Helpers for DispatcherService tests: sending, watching and waiting on runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

from google.rpc import error_details_pb2
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.dispatcher.service import Dispatcher
from switchboard.mesh import create_server
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.credentials.accesstokens import SigningKey, private_key_pem
from switchboard.platform.store.db import DatabaseUnavailable
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.kits.contextkit import Caller, context_stub, struct
from tests.kits.contextkit import Stub as ContextStub

Stub: TypeAlias = "dispatcher_pb2_grpc.DispatcherServiceAsyncStub"


def dispatcher_stub(channel: aio.Channel) -> Stub:
    return dispatcher_pb2_grpc.DispatcherServiceStub(channel)


def request(
    conversation: str,
    text: str,
    *,
    handler: str = "",
    request_id: str = "",
    policy: int = 0,
    timeout_s: float = 0.0,
    **parameters: Any,
) -> pb.SendMessageRequest:
    built = pb.SendMessageRequest(
        conversation=conversation,
        message=cpb.Message(parts=[cpb.ContentPart(text=text)]),
        handler=handler,
        request_id=request_id,
        concurrency_policy=policy,  # type: ignore[arg-type]
    )
    if parameters:
        built.parameters.CopyFrom(struct(**parameters))
    if timeout_s:
        built.timeout.FromMilliseconds(round(timeout_s * 1000))
    return built


def careful_assistant(integration: str, *, handler: str = "") -> pb.Assistant:
    """An assistant whose calls of ``integration``'s MCP ``echo`` each need a person's approval."""
    return pb.Assistant(
        display_name="Careful",
        handler=handler,
        tools=[
            pb.AssistantTools(
                integration=integration, tools=["echo"], approval_required_tools=["echo"]
            )
        ],
    )


def script_two_echoes(fake: FakeOpenAI) -> None:
    """The model calls ``mcp__echo`` twice (ids c1, c2), then answers "Heard: " and what the
    tools said, joined by " | "."""
    fake.script(
        Reply.tool_calls(
            [("mcp__echo", {"message": "one"}, "c1"), ("mcp__echo", {"message": "two"}, "c2")]
        ),
        lambda body: Reply.text(
            "Heard: "
            + " | ".join(m["content"] for m in body["messages"] if m.get("role") == "tool")
        ),
    )


async def send(stub: Stub, caller: Caller, req: pb.SendMessageRequest) -> pb.SendMessageResponse:
    return await stub.SendMessage(req, metadata=caller.md, timeout=CALL_DEADLINE_S)


async def updates(
    stub: Stub, caller: Caller, run: str, after: int = 0
) -> AsyncIterator[pb.RunUpdate]:
    """The run's updates (heartbeats skipped) until the stream ends."""
    call = stub.WatchRun(
        pb.WatchRunRequest(name=run, after_sequence=after),
        metadata=caller.md,
        timeout=CALL_DEADLINE_S,
    )
    async for frame in call:
        if frame.WhichOneof("frame") == "update":
            yield frame.update


@dataclass
class Watched:
    """Everything a watcher saw of one run."""

    updates: list[pb.RunUpdate] = field(default_factory=list)

    @property
    def states(self) -> list[int]:
        return [
            u.state_change.run.state
            for u in self.updates
            if u.WhichOneof("update") == "state_change"
        ]

    @property
    def text(self) -> str:
        return "".join(u.delta.text for u in self.updates if u.WhichOneof("update") == "delta")

    @property
    def final(self) -> pb.Run:
        last = self.updates[-1]
        assert last.WhichOneof("update") == "state_change"
        return last.state_change.run

    @property
    def sequences(self) -> list[int]:
        return [u.sequence for u in self.updates]


async def watch_all(stub: Stub, caller: Caller, run: str, after: int = 0) -> Watched:
    seen = Watched()
    async for update in updates(stub, caller, run, after):
        seen.updates.append(update)
    return seen


async def until(
    stub: Stub, caller: Caller, run: str, kind: str, *, state: int = 0
) -> tuple[aio.UnaryStreamCall[Any, Any], list[pb.RunUpdate]]:
    """Watch ``run`` until an update of ``kind`` (and ``state``) arrives; the call stays open."""
    call = stub.WatchRun(pb.WatchRunRequest(name=run), metadata=caller.md, timeout=CALL_DEADLINE_S)
    seen: list[pb.RunUpdate] = []
    async for frame in call:
        if frame.WhichOneof("frame") != "update":
            continue
        seen.append(frame.update)
        if frame.update.WhichOneof("update") == kind and (
            not state or frame.update.state_change.run.state == state
        ):
            return call, seen
    raise AssertionError(f"the run ended without a {kind} update: {seen}")


async def read_until(
    call: aio.UnaryStreamCall[Any, Any],
    seen: list[pb.RunUpdate],
    done: Callable[[list[pb.RunUpdate]], bool],
) -> None:
    """Add an open WatchRun call's updates (heartbeats skipped) to ``seen`` until
    ``done(seen)``; the call stays open for the next read."""
    async for frame in call:
        if frame.WhichOneof("frame") == "update":
            seen.append(frame.update)
            if done(seen):
                return


async def get_run(stub: Stub, caller: Caller, name: str) -> pb.Run:
    response = await stub.GetRun(
        pb.GetRunRequest(name=name), metadata=caller.md, timeout=CALL_DEADLINE_S
    )
    return response.run


async def cancel(stub: Stub, caller: Caller, name: str, reason: str = "") -> pb.Run:
    response = await stub.CancelRun(
        pb.CancelRunRequest(name=name, reason=reason), metadata=caller.md, timeout=CALL_DEADLINE_S
    )
    return response.run


async def finished(stub: Stub, caller: Caller, name: str) -> pb.Run:
    """The run once it is terminal (watched, not polled)."""
    seen = await watch_all(stub, caller, name)
    return seen.final


async def stored_running(stub: Stub, caller: Caller, name: str) -> None:
    """Return once the database holds ``name`` as RUNNING.

    Watchers see RUNNING, and a built-in handler starts, before that state
    is stored (docs/dispatcher.md): a crash before it lands leaves the run
    QUEUED, and recovery runs it again whatever the policy. A test that
    crashes a replica to see its running runs fail waits for this first.
    ListRuns filters on the stored state (GetRun answers from the owner's
    memory), so a run it lists as RUNNING is stored so.
    """
    parent = name.rsplit("/runs/", 1)[0]
    listing = pb.ListRunsRequest(parent=parent, states=[pb.RUN_STATE_RUNNING], page_size=100)
    deadline = time.monotonic() + CALL_DEADLINE_S
    while True:
        response = await stub.ListRuns(listing, metadata=caller.md, timeout=CALL_DEADLINE_S)
        if any(run.name == name for run in response.runs):
            return
        assert time.monotonic() < deadline, f"{name} was never stored as RUNNING"
        await asyncio.sleep(0.02)  # polling a stored state, under a deadline


def reason_of(run: pb.Run) -> str:
    """The ErrorInfo reason of a run's error (empty if it has none)."""
    info = error_details_pb2.ErrorInfo()
    for packed in run.error.details:
        if packed.Unpack(info):
            return str(info.reason)
    return ""


@asynccontextmanager
async def limited(
    **overrides: Any,
) -> AsyncIterator[tuple[SwitchboardServer, ContextStub, Stub]]:
    """A mesh of its own with these settings, and its context and dispatcher stubs."""
    server, _ = await create_server(make_settings(**overrides))
    await server.start()
    try:
        async with aio.insecure_channel(server.address) as channel:
            yield server, context_stub(channel), dispatcher_stub(channel)
    finally:
        await server.shutdown(grace=0)


async def eventually(
    check: Callable[[], Awaitable[object]], what: str, *, timeout_s: float = CALL_DEADLINE_S
) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)  # polling a condition with a deadline


# -- replicas --------------------------------------------------------------------------------


async def start_replicas(
    tmp_path: Path, database_url: str, redis_url: str, **settings: Any
) -> tuple[SwitchboardServer, SwitchboardServer]:
    """Replicas ``replica-a`` and ``replica-b`` on one database and one Redis, signing
    with one key, each with ``settings``, started; the caller shuts them down."""
    key_file = tmp_path / "k1.pem"
    key_file.write_bytes(private_key_pem(SigningKey.generate("k1")))
    servers = []
    for instance in ("replica-a", "replica-b"):
        server, _ = await create_server(
            make_settings(
                database_url=database_url,
                redis_url=redis_url,
                instance_id=instance,
                signing_keys=(str(key_file),),
                **settings,
            )
        )
        await server.start()
        servers.append(server)
    return servers[0], servers[1]


class Renewals:
    """A replica's lease renewals, refused while ``paused`` (its process goes on): paused
    for good, the replica is as good as dead to the others, which take its runs over."""

    def __init__(self, server: SwitchboardServer) -> None:
        dispatcher = server.shared.built(Dispatcher)
        assert dispatcher is not None, "this process built no Dispatcher"
        store = dispatcher._store
        real = store.renew_lease
        self.paused = False

        async def renew(*args: Any, **kwargs: Any) -> Any:
            if self.paused:
                raise DatabaseUnavailable()
            return await real(*args, **kwargs)

        store.renew_lease = renew  # type: ignore[method-assign]

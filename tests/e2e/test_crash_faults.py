"""Crash faults on the scaled-out shape: two `switchboard serve` replicas on one
PostgreSQL and one Redis (all started by the suite), one of them killed with
SIGKILL mid-load, or PostgreSQL stopped mid-run.

Counted, and all must be 0: acknowledged writes lost, acknowledged writes
without their event, events delivered twice, INTERNAL statuses, calls that
hung past their deadline. A run on the killed replica must reach its terminal
state under ``fail``, and a WatchRun on the survivor must end with it, with
strictly increasing sequences (``resume`` under SIGKILL:
tests/dispatcher/runs/test_durable_runs.py).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc
import pytest
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.dispatcher.runs.core.store import TERMINAL
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ServeProcess, shared_secrets
from tests.infra.postgres import (
    PostgresServer,
    _admin,
    running_postgres,
    start_postgres,
    stop_postgres,
)
from tests.infra.redis import RedisServer
from tests.kits.authkit import PASSWORD, unique_email
from tests.kits.contextkit import Caller, context_stub, create_conversation, create_workspace
from tests.kits.contextkit import Stub as ContextStub
from tests.kits.dispatchkit import (
    dispatcher_stub,
    read_until,
    reason_of,
    request,
    stored_running,
)

pytestmark = pytest.mark.e2e

#: How long a test waits for the system to settle (relay, takeover) before failing.
SETTLE_S: Final = 45.0
WRITERS: Final = 6
#: Acknowledged appends before the kill.
BEFORE_KILL: Final = 40
#: Appends each writer makes in all.
PER_WRITER: Final = 25
#: Lease of each dispatcher replica (its runs are taken over this long after it dies).
LEASE_S: Final = "2"
RETRYABLE: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


def _env(tmp_path: Path, database_url: str, redis_url: str) -> dict[str, str]:
    return {
        **shared_secrets(tmp_path),
        "SWITCHBOARD_DATABASE_URL": database_url,
        "SWITCHBOARD_REDIS_URL": redis_url,
        "SWITCHBOARD_DISPATCHER_LEASE_S": LEASE_S,
        "SWITCHBOARD_CONTEXT_MAX_WRITES_PER_MINUTE": "100000",
        "PYTHONFAULTHANDLER": "1",
    }


@pytest.fixture
def env(tmp_path: Path, durable_redis_server: RedisServer, postgres_url: str) -> dict[str, str]:
    return _env(tmp_path, postgres_url, durable_redis_server.url)


def _replicas(env: dict[str, str], recovery: str = "fail") -> tuple[ServeProcess, ServeProcess]:
    return tuple(  # type: ignore[return-value]
        ServeProcess(
            env={
                **env,
                "SWITCHBOARD_INSTANCE_ID": f"replica-{i}",
                "SWITCHBOARD_DISPATCHER_RECOVERY": recovery,
            }
        )
        for i in (1, 2)
    )


@dataclass
class Tally:
    """What the clients saw."""

    acked: dict[str, str] = field(default_factory=dict)  # message name -> conversation
    internal: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)


async def _register(address: str) -> Caller:
    async with aio.insecure_channel(address) as channel:
        response = await auth_pb2_grpc.AuthServiceStub(channel).Register(
            auth_pb2.RegisterRequest(email=unique_email("crash"), password=PASSWORD),
            timeout=CALL_DEADLINE_S,
        )
    return Caller(response.user.name.removeprefix("users/"), response.tokens.access_token)


async def _append_with_retries(
    stubs: list[ContextStub], caller: Caller, conversation: str, request_id: str, tally: Tally
) -> None:
    """One acknowledged append, retried with its request_id on the other replica."""
    append = cpb.AppendMessageRequest(
        parent=conversation,
        message=cpb.Message(role=cpb.MESSAGE_ROLE_USER, parts=[cpb.ContentPart(text=request_id)]),
        request_id=request_id,
    )
    deadline = time.monotonic() + SETTLE_S
    for attempt in itertools.count():
        stub = stubs[attempt % len(stubs)]
        try:
            response = await stub.AppendMessage(append, metadata=caller.md, timeout=CALL_DEADLINE_S)
        except aio.AioRpcError as error:
            code = error.code()
            if code == grpc.StatusCode.INTERNAL:
                tally.internal.append(f"{request_id}: {error.details()}")
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                tally.hangs.append(request_id)
            elif code not in RETRYABLE:
                tally.other.append(f"{request_id}: {code.name} {error.details()}")
                return
            assert time.monotonic() < deadline, f"{request_id} never acknowledged"
            await asyncio.sleep(min(0.05 * 2**attempt, 0.5))  # retry backoff
            continue
        tally.acked[response.message.name] = conversation
        return


async def _logged(address: str, caller: Caller, workspace: str) -> list[events_pb2.Event]:
    """Every MESSAGE_CREATED event the log retains for ``workspace``, oldest first."""
    events: list[events_pb2.Event] = []
    async with aio.insecure_channel(address) as channel:
        stub = events_pb2_grpc.EventServiceStub(channel)
        page_token = ""
        while True:
            page = await stub.ListEvents(
                events_pb2.ListEventsRequest(
                    scopes=[events_pb2.Scope(workspace=workspace)],
                    types=[events_pb2.EVENT_TYPE_MESSAGE_CREATED],
                    page_size=500,
                    page_token=page_token,
                ),
                metadata=caller.md,
                timeout=CALL_DEADLINE_S,
            )
            events.extend(page.events)
            page_token = page.next_page_token
            if not page_token:
                return events


async def _stored(address: str, caller: Caller, conversations: list[str]) -> set[str]:
    names: set[str] = set()
    async with aio.insecure_channel(address) as channel:
        stub = context_stub(channel)
        for conversation in conversations:
            page_token = ""
            while True:
                page = await stub.ListMessages(
                    cpb.ListMessagesRequest(
                        parent=conversation, page_size=500, page_token=page_token
                    ),
                    metadata=caller.md,
                    timeout=CALL_DEADLINE_S,
                )
                names.update(m.name for m in page.messages)
                page_token = page.next_page_token
                if not page_token:
                    break
    return names


async def test_a_replica_killed_mid_load_loses_no_write_and_no_event(
    env: dict[str, str],
) -> None:
    first, second = _replicas(env)
    with first, second:
        caller = await _register(second.address)
        async with (
            aio.insecure_channel(first.address) as on_first,
            aio.insecure_channel(second.address) as on_second,
        ):
            stubs = [context_stub(on_first), context_stub(on_second)]
            workspace = (await create_workspace(stubs[1], caller, "Crash")).name
            conversations = [
                (await create_conversation(stubs[1], caller, workspace)).name
                for _ in range(WRITERS)
            ]
            tally = Tally()

            async def writer(index: int) -> None:
                # Each writer starts on the replica that will die, half of the time.
                order = stubs if index % 2 == 0 else stubs[::-1]
                for n in range(PER_WRITER):
                    await _append_with_retries(
                        order, caller, conversations[index], f"w{index}-m{n}", tally
                    )

            writers = [asyncio.create_task(writer(i)) for i in range(WRITERS)]
            deadline = time.monotonic() + SETTLE_S
            while len(tally.acked) < BEFORE_KILL:
                assert time.monotonic() < deadline, "the load never got going"
                await asyncio.sleep(0.01)  # polling progress with a deadline
            assert first.proc is not None
            first.proc.kill()  # SIGKILL mid-load: no drain, no shutdown code
            await asyncio.wait_for(asyncio.gather(*writers), SETTLE_S)

        assert tally.internal == []
        assert tally.hangs == []
        assert tally.other == []
        assert len(tally.acked) == WRITERS * PER_WRITER

        stored = await _stored(second.address, caller, conversations)
        lost = set(tally.acked) - stored
        assert lost == set(), f"{len(lost)} acknowledged writes lost"

        # Events left in the dead replica's outbox are relayed by the survivor.
        names = await _all_logged(second.address, caller, workspace, set(tally.acked))
        missing = set(tally.acked) - set(names)
        assert missing == set(), f"{len(missing)} acknowledged writes have no event"
        duplicates = {name: n for name, n in names.items() if n > 1}
        assert duplicates == {}, f"{len(duplicates)} events delivered twice"


async def _all_logged(
    address: str, caller: Caller, workspace: str, acked: set[str]
) -> Counter[str]:
    """MESSAGE_CREATED events per message, once every acked one has its event (or time is up)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        events = await _logged(address, caller, workspace)
        names = Counter(e.message_created.message.name for e in events)
        if not acked - set(names) or time.monotonic() > deadline:
            return names
        await asyncio.sleep(0.2)  # polling the relay with a deadline


async def test_a_replica_killed_during_a_redis_outage_loses_no_event(
    tmp_path: Path, durable_redis_server: RedisServer, postgres_url: str
) -> None:
    """Events held in the dead replica's memory while Redis was away are published
    from the database outbox by the survivor."""
    env = {
        **_env(tmp_path, postgres_url, durable_redis_server.url),
        "SWITCHBOARD_REDIS_TIMEOUT_S": "0.2",
    }
    first, second = _replicas(env)
    with first, second:
        caller = await _register(second.address)
        async with aio.insecure_channel(first.address) as channel:
            stub = context_stub(channel)
            workspace = (await create_workspace(stub, caller, "Held")).name
            conversation = (await create_conversation(stub, caller, workspace)).name
            tally = Tally()
            durable_redis_server.pause()
            try:
                for n in range(10):
                    await _append_with_retries([stub], caller, conversation, f"held-{n}", tally)
                assert first.proc is not None
                first.proc.kill()  # its memory outbox dies with it
            finally:
                durable_redis_server.resume()
        assert tally.internal == []
        assert tally.hangs == []
        assert tally.other == []
        acked = set(tally.acked)
        assert len(acked) == 10
        names = await _all_logged(second.address, caller, workspace, acked)
        missing = acked - set(names)
        assert missing == set(), f"{len(missing)} acknowledged writes have no event"
        assert {name: n for name, n in names.items() if n > 1} == {}


async def test_a_run_on_a_killed_replica_ends_for_its_watcher_on_the_survivor(
    env: dict[str, str],
) -> None:
    # Under ``fail``; a killed replica's runs continued (``resume``, ``requeue``) with
    # watchers on the survivor are tests/dispatcher/runs/test_durable_runs.py's, and a requeued
    # echo run's unspliced answer is tests/platform/store/test_crash_consistency.py's.
    recovery = "fail"
    first, second = _replicas(env, recovery)
    with first, second:
        caller = await _register(second.address)
        async with (
            aio.insecure_channel(first.address) as on_first,
            aio.insecure_channel(second.address) as on_second,
        ):
            stub = context_stub(on_second)
            workspace = (await create_workspace(stub, caller, "Runs")).name
            conversation = (await create_conversation(stub, caller, workspace)).name
            words = " ".join(f"word{i}" for i in range(16))
            sent = await dispatcher_stub(on_first).SendMessage(
                request(conversation, words, delay_ms=250),
                metadata=caller.md,
                timeout=CALL_DEADLINE_S,
            )
            name = sent.run.name
            survivor = dispatcher_stub(on_second)
            call = survivor.WatchRun(
                pb.WatchRunRequest(name=name), metadata=caller.md, timeout=SETTLE_S
            )
            seen: list[pb.RunUpdate] = []
            await read_until(call, seen, lambda seen: sum(u.HasField("delta") for u in seen) >= 3)
            # The handler does not wait for RUNNING to be stored; killed before
            # that, the run would be QUEUED in the store and simply run again.
            await stored_running(survivor, caller, name)
            assert first.proc is not None
            first.proc.kill()  # the run's owner dies mid-stream
            await read_until(call, seen, lambda seen: seen[-1].state_change.run.state in TERMINAL)

            sequences = [u.sequence for u in seen]
            assert sequences == sorted(set(sequences)), "a sequence was reused or went back"
            assert seen[-1].state_change.run.state in TERMINAL, "the watcher never saw the end"
            end = seen[-1].state_change.run
            stored = (
                await survivor.GetRun(
                    pb.GetRunRequest(name=name), metadata=caller.md, timeout=CALL_DEADLINE_S
                )
            ).run
            assert stored.state == end.state
            assert stored.state == pb.RUN_STATE_FAILED
            assert reason_of(stored) == "ERROR_REASON_RUN_INTERRUPTED"
            # Nothing left active: a REJECT-policy message is accepted.
            again = await survivor.SendMessage(
                request(conversation, "next", policy=pb.CONCURRENCY_POLICY_REJECT),
                metadata=caller.md,
                timeout=CALL_DEADLINE_S,
            )
            assert again.run.name


@pytest.fixture
async def private_postgres() -> AsyncIterator[PostgresServer]:
    """A cluster of this test's own, stopped and started mid-test; durable, unlike the
    suite's (a commit acknowledged before the stop must be there after it)."""
    with running_postgres() as server:
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            await _admin(server, f"ALTER SYSTEM SET {setting} = on")
        await _admin(server, "SELECT pg_reload_conf()")
        yield server


async def test_a_run_across_a_database_outage_ends_stored_as_announced(
    tmp_path: Path, durable_redis_server: RedisServer, private_postgres: PostgresServer
) -> None:
    env = {
        **_env(tmp_path, private_postgres.url("postgres"), durable_redis_server.url),
        # Longer than the outage plus a reconnect: the run stays its owner's, so
        # the owner's retried final save is what is tested.
        "SWITCHBOARD_DISPATCHER_LEASE_S": "20",
    }
    first, second = _replicas(env)
    with first, second:
        caller = await _register(first.address)
        async with aio.insecure_channel(first.address) as channel:
            stub, dstub = context_stub(channel), dispatcher_stub(channel)
            workspace = (await create_workspace(stub, caller, "Outage")).name
            conversation = (await create_conversation(stub, caller, workspace)).name
            sent = await dstub.SendMessage(
                request(conversation, "a b c d e f g h", delay_ms=300),
                metadata=caller.md,
                timeout=CALL_DEADLINE_S,
            )
            call = dstub.WatchRun(
                pb.WatchRunRequest(name=sent.run.name), metadata=caller.md, timeout=SETTLE_S
            )
            seen: list[pb.RunUpdate] = []
            await read_until(call, seen, lambda seen: seen[-1].HasField("delta"))
            # The run ends while the database is away: its answer cannot be
            # stored, and neither can its end until the database is back.
            await asyncio.to_thread(stop_postgres, private_postgres)
            try:
                await asyncio.sleep(5)  # the outage itself, as the issue measured it
            finally:
                await asyncio.to_thread(start_postgres, private_postgres)
            # A stream whose credential cannot be checked during the outage ends
            # UNAVAILABLE (it fails closed: docs/security.md); a client resumes it
            # from the last sequence it saw, as the docs say, and misses nothing.
            deadline = time.monotonic() + SETTLE_S
            while True:
                try:
                    await read_until(
                        call, seen, lambda seen: seen[-1].state_change.run.state in TERMINAL
                    )
                    break
                except aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                        raise
                # A retry's backoff, as a client's (the database may still be coming back).
                await asyncio.sleep(0.2)
                call = dstub.WatchRun(
                    pb.WatchRunRequest(name=sent.run.name, after_sequence=seen[-1].sequence),
                    metadata=caller.md,
                    timeout=SETTLE_S,
                )
            end = seen[-1].state_change.run
            assert end.state in TERMINAL
            sequences = [u.sequence for u in seen]
            assert sequences == sorted(set(sequences))
            if end.state == pb.RUN_STATE_FAILED:
                # The database, not the handler: UNAVAILABLE, never INTERNAL.
                assert end.error.code == grpc.StatusCode.UNAVAILABLE.value[0], end.error
            for address in (first.address, second.address):
                async with aio.insecure_channel(address) as other:
                    stored = (
                        await dispatcher_stub(other).GetRun(
                            pb.GetRunRequest(name=sent.run.name),
                            metadata=caller.md,
                            timeout=CALL_DEADLINE_S,
                        )
                    ).run
                assert stored.state == end.state
            again = await dstub.SendMessage(
                request(conversation, "next", policy=pb.CONCURRENCY_POLICY_REJECT),
                metadata=caller.md,
                timeout=CALL_DEADLINE_S,
            )
            assert again.run.name

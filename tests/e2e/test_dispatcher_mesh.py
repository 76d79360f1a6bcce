"""The mesh shape: the dispatcher in its own process reaches the context
service in another only through its gRPC contract (SWITCHBOARD_CONTEXT_ADDRESS),
with a token minted for the run's user; and a dispatcher killed mid-run
fails that run (RUN_INTERRUPTED, recovery policy ``fail``) and runs the queued
ones when it is back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack

import pytest
from grpc import aio

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from tests.conftest import CALL_DEADLINE_S
from tests.dispatcher.memory.memorykit import Model, fact
from tests.e2e import modulescope
from tests.e2e.procs import ServeProcess, shared_secrets
from tests.e2e.starts import serving
from tests.fakes.openai_server import FakeOpenAI
from tests.infra.postgres import PostgresServer
from tests.infra.redis import RedisServer
from tests.kits.contextkit import (
    Caller,
    add_member,
    all_messages,
    context_stub,
    create_conversation,
    create_workspace,
)
from tests.kits.dispatchkit import (
    cancel,
    dispatcher_stub,
    eventually,
    finished,
    get_run,
    reason_of,
    request,
    send,
    stored_running,
    until,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from modulescope.redis(tmp_path_factory)


@pytest.fixture(scope="module")
def database_url(postgres_server: PostgresServer, migrated_template: str) -> Iterator[str]:
    yield from modulescope.database(postgres_server, migrated_template)


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_server: RedisServer
) -> dict[str, str]:
    """For the module: each test signs up users of its own, and its dispatcher
    processes end their runs (or leave none running) before the next test starts."""
    return {
        **shared_secrets(tmp_path_factory.mktemp("mesh")),
        # Processes share PostgreSQL (a SQLite file belongs to one process), and
        # so their events go through Redis (the embedded log is per process).
        "SWITCHBOARD_DATABASE_URL": database_url,
        "SWITCHBOARD_REDIS_URL": redis_server.url,
        "SWITCHBOARD_INSTANCE_ID": "dispatcher-1",
    }


@pytest.fixture(scope="module")
def context_process(env: dict[str, str]) -> Iterator[ServeProcess]:
    with ServeProcess("--services", "auth,context,events", env=env) as process:
        yield process


async def _caller(address: str) -> Caller:
    from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
    from tests.kits.authkit import PASSWORD, unique_email

    async with aio.insecure_channel(address) as channel:
        response = await auth_pb2_grpc.AuthServiceStub(channel).Register(
            auth_pb2.RegisterRequest(email=unique_email("mesh"), password=PASSWORD),
            timeout=CALL_DEADLINE_S,
        )
    return Caller(response.user.name.removeprefix("users/"), response.tokens.access_token)


async def test_a_dispatcher_process_uses_the_context_service_over_grpc(
    context_process: ServeProcess, env: dict[str, str]
) -> None:
    ctx_address = f"127.0.0.1:{context_process.port}"
    with ServeProcess(
        "--services", "dispatcher", env={**env, "SWITCHBOARD_CONTEXT_ADDRESS": ctx_address}
    ) as dispatcher_process:
        owner = await _caller(ctx_address)
        viewer = await _caller(ctx_address)
        async with (
            aio.insecure_channel(ctx_address) as ctx_channel,
            aio.insecure_channel(f"127.0.0.1:{dispatcher_process.port}") as d_channel,
        ):
            stub, dstub = context_stub(ctx_channel), dispatcher_stub(d_channel)
            workspace = await create_workspace(stub, owner, "Mesh")
            await add_member(stub, owner, workspace.name, viewer, cpb.WORKSPACE_ROLE_VIEWER)
            conversation = (await create_conversation(stub, owner, workspace.name)).name

            sent = await send(dstub, owner, request(conversation, "across the mesh"))
            run = await finished(dstub, owner, sent.run.name)
            messages = await all_messages(stub, owner, conversation)

            assert run.state == pb.RUN_STATE_SUCCEEDED
            assert [m.name for m in messages] == [sent.message.name, run.output_message]
            assert messages[1].parts[0].text.startswith("across the mesh")
            # The context service, not the dispatcher, decides who may write.
            with pytest.raises(aio.AioRpcError) as caught:
                await send(dstub, viewer, request(conversation, "viewer"))
            assert caught.value.code().name == "PERMISSION_DENIED"


async def test_edits_and_regenerated_answers_run_on_their_branches_across_the_mesh(
    context_process: ServeProcess, env: dict[str, str]
) -> None:
    """The dispatcher forks through the context service's contract (an edit's append
    with ``replaces``, a regenerated answer's CreateBranch), and its runs write on
    their branches there."""
    ctx_address = f"127.0.0.1:{context_process.port}"
    with ServeProcess(
        "--services", "dispatcher", env={**env, "SWITCHBOARD_CONTEXT_ADDRESS": ctx_address}
    ) as dispatcher_process:
        owner = await _caller(ctx_address)
        async with (
            aio.insecure_channel(ctx_address) as ctx_channel,
            aio.insecure_channel(f"127.0.0.1:{dispatcher_process.port}") as d_channel,
        ):
            stub, dstub = context_stub(ctx_channel), dispatcher_stub(d_channel)
            workspace = await create_workspace(stub, owner, "Mesh branches")
            conversation = (await create_conversation(stub, owner, workspace.name)).name
            first = await send(dstub, owner, request(conversation, "first try", handler="echo"))
            answered = await finished(dstub, owner, first.run.name)
            edit = request(conversation, "second try", handler="echo")
            edit.replaces = first.message.name
            edited = await send(dstub, owner, edit)
            assert edited.message.branch == 2
            assert (await finished(dstub, owner, edited.run.name)).branch == 2
            again = await dstub.RegenerateMessage(
                pb.RegenerateMessageRequest(message=answered.output_message, request_id="r-1"),
                metadata=owner.md,
                timeout=CALL_DEADLINE_S,
            )
            redone = await finished(dstub, owner, again.run.name)
            assert (redone.state, redone.branch) == (pb.RUN_STATE_SUCCEEDED, 3)
            listed = await stub.ListMessages(
                cpb.ListMessagesRequest(parent=conversation),
                metadata=owner.md,
                timeout=CALL_DEADLINE_S,
            )
            assert [m.name for m in listed.messages] == [
                first.message.name,
                redone.output_message,
            ]
            assert list(listed.messages[1].siblings) == [
                answered.output_message,
                redone.output_message,
            ]


async def test_a_killed_dispatcher_fails_running_runs_and_runs_queued_ones(
    context_process: ServeProcess, env: dict[str, str]
) -> None:
    ctx_address = f"127.0.0.1:{context_process.port}"
    owner = await _caller(ctx_address)
    async with aio.insecure_channel(ctx_address) as ctx_channel:
        stub = context_stub(ctx_channel)
        workspace = await create_workspace(stub, owner, "Crash")
        conversation = (await create_conversation(stub, owner, workspace.name)).name

    # `fail` (not the default `resume`, which would run the echo run again).
    env = {**env, "SWITCHBOARD_DISPATCHER_RECOVERY": "fail"}
    with ServeProcess("--services", "dispatcher", env=env) as first:
        async with aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            dstub = dispatcher_stub(channel)
            running = await send(dstub, owner, request(conversation, "slow one", delay_ms=60_000))
            await until(dstub, owner, running.run.name, "delta")
            # The first words come before RUNNING is stored; only a stored
            # RUNNING fails in recovery (a QUEUED one runs again).
            await stored_running(dstub, owner, running.run.name)
            queued = await send(dstub, owner, request(conversation, "queued one"))
        assert first.proc is not None
        first.proc.kill()  # no drain, no shutdown code: a crash
        first.proc.wait()

    with ServeProcess("--services", "dispatcher", env=env) as second:
        async with aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
            dstub = dispatcher_stub(channel)
            crashed = await get_run(dstub, owner, running.run.name)
            assert crashed.state == pb.RUN_STATE_FAILED
            assert reason_of(crashed) == "ERROR_REASON_RUN_INTERRUPTED"
            after = await finished(dstub, owner, queued.run.name)
            assert after.state == pb.RUN_STATE_SUCCEEDED


async def test_another_replica_follows_a_run_through_the_shared_log(
    context_process: ServeProcess, env: dict[str, str], redis_server: RedisServer
) -> None:
    """Two dispatcher replicas on one Redis: WatchRun on the replica that does not own the
    run follows it through the run's events; CancelRun there is forwarded to the owner."""
    shared = {**env, "SWITCHBOARD_REDIS_URL": redis_server.url}
    ctx_address = f"127.0.0.1:{context_process.port}"
    owner = await _caller(ctx_address)
    async with aio.insecure_channel(ctx_address) as ctx_channel:
        stub = context_stub(ctx_channel)
        workspace = await create_workspace(stub, owner, "Replicas")
        conversation = (await create_conversation(stub, owner, workspace.name)).name
    with ExitStack() as stack:
        a, b = (
            ServeProcess(
                "--services", "dispatcher", env={**shared, "SWITCHBOARD_INSTANCE_ID": name}
            )
            for name in ("replica-a", "replica-b")
        )
        serving(stack, a, b)
        async with (
            aio.insecure_channel(f"127.0.0.1:{a.port}") as channel_a,
            aio.insecure_channel(f"127.0.0.1:{b.port}") as channel_b,
        ):
            on_a, on_b = dispatcher_stub(channel_a), dispatcher_stub(channel_b)
            sent = await send(
                on_a, owner, request(conversation, "slow words here", delay_ms=60_000)
            )
            await until(on_a, owner, sent.run.name, "delta")
            # Replica B: a snapshot first, then the live updates. A built-in handler's
            # first delta may come before its RUNNING is stored (docs/decisions.md, 24):
            # B's snapshot is QUEUED or RUNNING, and RUNNING follows if it was not.
            call, seen = await until(
                on_b, owner, sent.run.name, "state_change", state=pb.RUN_STATE_RUNNING
            )
            assert seen[0].WhichOneof("update") == "state_change"
            assert seen[0].state_change.run.state in (pb.RUN_STATE_QUEUED, pb.RUN_STATE_RUNNING)
            cancelled = await cancel(on_b, owner, sent.run.name, "enough")
            assert cancelled.state == pb.RUN_STATE_CANCELLED
            assert cancelled.error.message == f"enough (by {owner.name})"
            rest = [f.update async for f in call if f.WhichOneof("frame") == "update"]
    assert rest[-1].state_change.run.state == pb.RUN_STATE_CANCELLED
    assert rest[-1].state_change.run.error.message == cancelled.error.message
    assert [u.sequence for u in rest] == sorted({u.sequence for u in rest})
    assert rest[0].sequence > seen[-1].sequence


async def test_memory_forms_across_the_mesh(
    context_process: ServeProcess, env: dict[str, str]
) -> None:
    """Memory forming in a dispatcher process of its own: it reads the exchange, searches
    the nearest memories and applies its decisions through the context service's contract,
    as the run's person (docs/memory.md)."""
    ctx_address = f"127.0.0.1:{context_process.port}"
    script = Model()
    script.facts["I live in Porto."] = [[fact("Lives in Porto.")]]
    script.facts["I moved to Lyon."] = [[fact("Lives in Lyon.")]]
    script.decisions["Lives in Lyon."] = ("update", "Lives in Porto.")
    async with FakeOpenAI(default=script) as model:
        with ServeProcess(
            "--services",
            "dispatcher",
            env={
                **env,
                "SWITCHBOARD_CONTEXT_ADDRESS": ctx_address,
                "SWITCHBOARD_INSTANCE_ID": "dispatcher-memory",
                "SWITCHBOARD_LLM_BASE_URL": model.url,
                "SWITCHBOARD_LLM_MODEL": "m-1",
                "SWITCHBOARD_MEMORY_FORMING": "true",
                "SWITCHBOARD_MEMORY_POLL_S": "0.2",
            },
        ) as dispatcher_process:
            owner = await _caller(ctx_address)
            async with (
                aio.insecure_channel(ctx_address) as ctx_channel,
                aio.insecure_channel(f"127.0.0.1:{dispatcher_process.port}") as d_channel,
            ):
                stub, dstub = context_stub(ctx_channel), dispatcher_stub(d_channel)
                workspace = await create_workspace(stub, owner, "Mesh memory")
                keeper = await dstub.CreateAssistant(
                    pb.CreateAssistantRequest(
                        parent=workspace.name,
                        assistant=pb.Assistant(
                            display_name="Keeper",
                            memory_policy=cpb.MemoryPolicy(mode=cpb.MEMORY_FORMING_MODE_USER),
                        ),
                    ),
                    metadata=owner.md,
                    timeout=CALL_DEADLINE_S,
                )
                conversation = (await create_conversation(stub, owner, workspace.name)).name

                async def remembered(content: str) -> list[cpb.MemoryItem]:
                    async def current() -> list[cpb.MemoryItem]:
                        listed = await stub.ListMemoryItems(
                            cpb.ListMemoryItemsRequest(parent=owner.name, workspace=workspace.name),
                            metadata=owner.md,
                            timeout=CALL_DEADLINE_S,
                        )
                        return list(listed.memory_items)

                    await eventually(lambda: _holds(current, content), f"{content!r} remembered")
                    return await current()

                for said in ("I live in Porto.", "I moved to Lyon."):
                    sent_request = request(conversation, said)
                    sent_request.assistant = keeper.assistant.name
                    sent = await send(dstub, owner, sent_request)
                    run = await finished(dstub, owner, sent.run.name)
                    assert run.state == pb.RUN_STATE_SUCCEEDED
                    if said.startswith("I live"):
                        [porto] = await remembered("Lives in Porto.")
                        assert list(porto.source_messages) == [
                            run.input_message,
                            run.output_message,
                        ]
                [lyon] = await remembered("Lives in Lyon.")
                assert lyon.supersedes == porto.name
                assert lyon.formation.assistant == keeper.assistant.name
                assert lyon.workspace == workspace.name


async def _holds(read: Callable[[], Awaitable[list[cpb.MemoryItem]]], content: str) -> bool:
    return [item.content for item in await read()] == [content]

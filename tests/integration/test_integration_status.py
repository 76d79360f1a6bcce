"""The hub's view of a live integration: probes, status, WatchIntegrations, tools, breakers.

A Node.js HandlerService expert (clients/node/expert.mjs) is a real process:
registered through CreateIntegration, probed (grpc.health.v1), stopped and
restarted on the same port. Probes are driven through the hub's ``probe_all``
(what its timer runs), so the test waits on nothing but the answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc import aio

from switchboard.api.events.v1 import events_pb2
from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.integration.service import IntegrationHub
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S, built
from tests.e2e.expertproc import NodeExpert
from tests.kits.authkit import detail, reason
from tests.kits.contextkit import World, context_stub, ctx_world, refused, tap, violations
from tests.kits.integrationkit import Stub, create, expert, hub_mesh, integration_stub

pytestmark = pytest.mark.e2e

CODE = grpc.StatusCode
TOKEN = "expert-token-0123456789"


@pytest.fixture
async def hub() -> AsyncIterator[tuple[SwitchboardServer, Stub, World]]:
    async with hub_mesh(integration_breaker_failures=2, integration_breaker_reset_s=600) as (
        server,
        channel,
    ):
        world = await ctx_world(server, context_stub(channel))
        yield server, integration_stub(channel), world


async def _next(stream: Any) -> ipb.WatchIntegrationsResponse:
    frame: ipb.WatchIntegrationsResponse = await asyncio.wait_for(stream.read(), CALL_DEADLINE_S)
    return frame


async def _status(stub: Stub, world: World, name: str) -> ipb.IntegrationStatus:
    got = await stub.GetIntegration(
        ipb.GetIntegrationRequest(name=name), metadata=world.viewer.md, timeout=CALL_DEADLINE_S
    )
    return got.integration.status


async def test_probes_follow_an_expert_down_and_back_and_watchers_see_each_change(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    server, stub, world = hub
    prober = built(server, IntegrationHub)
    with NodeExpert("--token", TOKEN) as process:
        made = await create(
            stub, world.owner, world.name, expert(process.address, credential=TOKEN)
        )
        assert made.status.health == ipb.HEALTH_STATE_UNSPECIFIED
        stream = stub.WatchIntegrations(
            ipb.WatchIntegrationsRequest(parent=world.name), metadata=world.viewer.md
        )
        try:
            assert (await _next(stream)).integration.name == made.name
            assert (await _next(stream)).snapshot_complete
            await prober.probe_all()
            healthy = await _next(stream)
            assert healthy.integration.status.health == ipb.HEALTH_STATE_HEALTHY
            since = healthy.integration.status.health_since.ToDatetime()
            port = process.port
            process.kill()
            await prober.probe_all()
            degraded = (await _next(stream)).integration.status
            assert degraded.health == ipb.HEALTH_STATE_DEGRADED
            assert degraded.consecutive_failures == 1
            assert degraded.last_error.code == grpc.StatusCode.UNAVAILABLE.value[0]
            await prober.probe_all()
            down = (await _next(stream)).integration.status
            assert down.health == ipb.HEALTH_STATE_UNHEALTHY
            assert down.health_since.ToDatetime() >= since
            # A failing integration's count goes on with each probe.
            await prober.probe_all()
            assert (await _status(stub, world, made.name)).consecutive_failures == 3
            with NodeExpert("--token", TOKEN, port=port):
                await prober.probe_all()
                frames = [await _next(stream)]
                while frames[-1].integration.status.consecutive_failures == 3:
                    frames.append(await _next(stream))
                back = frames[-1].integration.status
                assert back.health == ipb.HEALTH_STATE_HEALTHY
                assert back.consecutive_failures == 0
                # Recovered: the old failure is not its status any more.
                assert not back.HasField("last_error")
                assert not (await _status(stub, world, made.name)).HasField("last_error")
                # A healthy verdict that changes nothing writes nothing (not even the time).
                await prober.probe_all()
                still = await _status(stub, world, made.name)
                assert still.last_probe_time == back.last_probe_time
        finally:
            stream.cancel()


async def test_an_experts_tool_is_listed_validated_invoked_and_audited(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    server, stub, world = hub
    with NodeExpert("--token", TOKEN, "--id", "summarizer") as process:
        made = await create(
            stub, world.owner, world.name, expert(process.address, credential=TOKEN)
        )
        tools = (
            await stub.ListTools(
                ipb.ListToolsRequest(parent=made.name),
                metadata=world.viewer.md,
                timeout=CALL_DEADLINE_S,
            )
        ).tools
        assert [t.name for t in tools] == [f"{made.name}/tools/summarizer"]
        assert "input" in tools[0].input_schema.fields["properties"].struct_value.fields
        arguments = struct_pb2.Struct()
        arguments.update({"input": "three little words"})
        with tap(server) as events:
            answer = await stub.InvokeTool(
                ipb.InvokeToolRequest(name=tools[0].name, arguments=arguments),
                metadata=world.editor.md,
                timeout=CALL_DEADLINE_S,
            )
            assert "three little words" in answer.text
            assert not answer.is_error
            assert answer.latency.ToNanoseconds() > 0
            bad = await refused(
                stub.InvokeTool(
                    ipb.InvokeToolRequest(name=tools[0].name, arguments=struct_pb2.Struct()),
                    metadata=world.editor.md,
                    timeout=CALL_DEADLINE_S,
                ),
                CODE.INVALID_ARGUMENT,
            )
            assert violations(bad) == ["arguments"]
            await refused(
                stub.InvokeTool(
                    ipb.InvokeToolRequest(name=f"{made.name}/tools/nope", arguments=arguments),
                    metadata=world.editor.md,
                    timeout=CALL_DEADLINE_S,
                ),
                CODE.NOT_FOUND,
            )

            async def audited() -> list[events_pb2.Event]:
                while True:
                    found = [
                        e for e in events.events if e.type == events_pb2.EVENT_TYPE_TOOL_INVOKED
                    ]
                    if found:
                        return found
                    await asyncio.sleep(0.02)  # polling a condition with a deadline

            records = await asyncio.wait_for(audited(), CALL_DEADLINE_S)
        assert [r.tool_invoked.tool for r in records] == [tools[0].name]
        record = records[0]
        assert record.actor.name == world.editor.name
        assert record.workspace == world.name
        assert record.tool_invoked.status.code == 0
        assert b"three little words" not in record.SerializeToString()
        assert TOKEN.encode() not in record.SerializeToString()


async def test_an_open_circuit_answers_unavailable_at_once_with_a_retry_delay(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    _, stub, world = hub
    with NodeExpert("--token", TOKEN, "--id", "summarizer") as process:
        made = await create(
            stub, world.owner, world.name, expert(process.address, credential=TOKEN)
        )
        tool = f"{made.name}/tools/summarizer"
        arguments = struct_pb2.Struct()
        arguments.update({"input": "hello"})
        invoke = ipb.InvokeToolRequest(name=tool, arguments=arguments)
        await stub.InvokeTool(invoke, metadata=world.editor.md, timeout=CALL_DEADLINE_S)
        process.kill()
    for _ in range(2):
        failed = await refused(
            stub.InvokeTool(invoke, metadata=world.editor.md, timeout=CALL_DEADLINE_S),
            CODE.UNAVAILABLE,
        )
        assert reason(failed) == "ERROR_REASON_DEPENDENCY_UNAVAILABLE"
    opened = await refused(
        stub.InvokeTool(invoke, metadata=world.editor.md, timeout=CALL_DEADLINE_S), CODE.UNAVAILABLE
    )
    assert reason(opened) == "ERROR_REASON_CIRCUIT_OPEN"
    assert made.name in (opened.details() or "")
    retry: error_details_pb2.RetryInfo = detail(opened, error_details_pb2.RetryInfo)
    assert 0 < retry.retry_delay.seconds <= 600
    status = await _status(stub, world, made.name)
    assert status.circuit == ipb.CIRCUIT_STATE_OPEN
    assert status.HasField("circuit_retry_time")


async def test_a_caller_who_may_not_invoke_is_refused_before_anything_is_called(
    hub: tuple[SwitchboardServer, Stub, World],
) -> None:
    _, stub, world = hub
    made = await create(stub, world.owner, world.name, expert())
    error = await refused(
        stub.InvokeTool(
            ipb.InvokeToolRequest(name=f"{made.name}/tools/x"),
            metadata=world.viewer.md,
            timeout=CALL_DEADLINE_S,
        ),
        CODE.PERMISSION_DENIED,
    )
    assert isinstance(error, aio.AioRpcError)

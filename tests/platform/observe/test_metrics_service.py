"""The metrics endpoint of a real server: a known load moves the counters by exactly its size.

The server runs with ``SWITCHBOARD_METRICS_PORT=0``; the test scrapes the bound
port over HTTP before and after the load and compares. Label values are the
documented bounded ones, and no id of anything the load created appears
anywhere in the text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.mesh import create_server
from switchboard.platform.observe.metrics import SPECS, series_names
from switchboard.platform.rpc.server import SwitchboardServer
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.kits.contextkit import (
    context_stub,
    create_conversation,
    create_workspace,
    new_caller,
    refused,
)
from tests.kits.dispatchkit import dispatcher_stub, finished, request, send
from tests.kits.eventkit import Subscriber

pytestmark = pytest.mark.service

GET_WORKSPACE = "switchboard.api.context.v1.ContextService/GetWorkspace"
SUBSCRIBE = "switchboard.api.events.v1.EventService/Subscribe"
#: Successful and refused calls of the known load.
OK_CALLS = 4
BAD_CALLS = 3

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def served() -> AsyncIterator[SwitchboardServer]:
    server, _ = await create_server(make_settings(metrics_port=0))
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown(grace=0)


async def scrape(server: SwitchboardServer) -> tuple[str, Samples]:
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=CALL_DEADLINE_S
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_a_known_load_moves_the_counters_by_its_size(served: SwitchboardServer) -> None:
    assert served.metrics_port > 0
    caller = await new_caller(served)
    async with aio.insecure_channel(served.address) as channel:
        context = context_stub(channel)
        workspace = await create_workspace(context, caller)
        _, before = await scrape(served)

        for _ in range(OK_CALLS):
            await context.GetWorkspace(
                cpb.GetWorkspaceRequest(name=workspace.name),
                metadata=caller.md,
                timeout=CALL_DEADLINE_S,
            )
        for _ in range(BAD_CALLS):
            await refused(
                context.GetWorkspace(
                    cpb.GetWorkspaceRequest(name="workspaces/Not Valid"),
                    metadata=caller.md,
                    timeout=CALL_DEADLINE_S,
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
        _, after = await scrape(served)

    requests = "switchboard_rpc_requests_total"
    assert delta(before, after, requests, method=GET_WORKSPACE, code="OK") == OK_CALLS
    assert delta(before, after, requests, method=GET_WORKSPACE, code="INVALID_ARGUMENT") == (
        BAD_CALLS
    )
    count = "switchboard_rpc_duration_seconds_count"
    assert delta(before, after, count, method=GET_WORKSPACE) == OK_CALLS + BAD_CALLS
    inf = value(after, "switchboard_rpc_duration_seconds_bucket", method=GET_WORKSPACE, le="+Inf")
    assert inf == value(after, count, method=GET_WORKSPACE)
    assert value(after, "switchboard_rpc_in_flight", method=GET_WORKSPACE) == 0


async def test_runs_subscribers_and_dependencies(served: SwitchboardServer) -> None:
    caller = await new_caller(served)
    async with aio.insecure_channel(served.address) as channel:
        context, dispatcher = context_stub(channel), dispatcher_stub(channel)
        workspace = await create_workspace(context, caller)
        conversation = await create_conversation(context, caller, workspace.name)
        _, before = await scrape(served)

        subscriber = Subscriber(channel, caller.token, scopes=[{"workspace": workspace.name}])
        await subscriber.live()
        response = await send(dispatcher, caller, request(conversation.name, "hello"))
        run = await finished(dispatcher, caller, response.run.name)
        await subscriber.until(1)  # the run's events reached the subscriber
        _, during = await scrape(served)
        subscriber.call.cancel()

    ended = "switchboard_runs_ended_total"
    assert run.state == 3  # RUN_STATE_SUCCEEDED
    assert delta(before, during, ended, handler="echo", state="succeeded") == 1
    assert delta(before, during, "switchboard_run_duration_seconds_count", handler="echo",
                 state="succeeded") == 1  # fmt: skip
    assert delta(before, during, "switchboard_run_queue_wait_seconds_count") == 1
    for state in ("queued", "running", "requires_action"):
        assert value(during, "switchboard_runs_active", state=state) == 0
    assert value(during, "switchboard_subscribers", stream="events") == 1
    assert value(during, "switchboard_subscribers", stream="runs") == 0
    assert value(during, "switchboard_rpc_in_flight", method=SUBSCRIBE) == 1
    assert delta(before, during, "switchboard_event_append_seconds_count") >= 1
    assert value(during, "switchboard_event_subscriber_backlog_max_events") >= 0
    assert value(during, "switchboard_event_log_degraded") == 0
    assert value(during, "switchboard_event_outbox_events", outbox="memory") == 0
    assert value(during, "switchboard_dependency_up", dependency="database") == 1
    assert value(during, "switchboard_dependency_outages_total", dependency="database") == 0
    assert value(during, "switchboard_db_pool_max_connections") > 0


async def test_labels_are_documented_and_carry_no_ids(served: SwitchboardServer) -> None:
    caller = await new_caller(served)
    ids: list[str] = [caller.id]
    async with aio.insecure_channel(served.address) as channel:
        context, dispatcher = context_stub(channel), dispatcher_stub(channel)
        for n in range(2):
            workspace = await create_workspace(context, caller, workspace_id=f"metrics-ws-{n}")
            conversation = await create_conversation(context, caller, workspace.name)
            response = await send(dispatcher, caller, request(conversation.name, "hi"))
            await finished(dispatcher, caller, response.run.name)
            ids += [
                workspace.name.removeprefix("workspaces/"),
                conversation.name.rsplit("/", 1)[-1],
                response.run.name.rsplit("/", 1)[-1],
                response.message.name.rsplit("/", 1)[-1],
            ]
        text, samples = await scrape(served)

    for found in ids:
        assert found not in text, f"an id ({found}) appears in the metrics"
    labels = {spec.name: set(spec.labels) for spec in SPECS}
    known = series_names()
    for name, pairs in samples:
        assert name in known, f"{name} is not a declared metric"
        spec_name = _spec_of(name)
        if spec_name is not None:
            allowed = labels[spec_name] | ({"le"} if name.endswith("_bucket") else set())
            assert {key for key, _ in pairs} <= allowed, (name, pairs)
    methods = {dict(pairs).get("method") for name, pairs in samples if "method" in dict(pairs)}
    assert all(m is not None and m.count("/") == 1 for m in methods), methods


def _spec_of(series: str) -> str | None:
    for spec in SPECS:
        base = spec.name.removesuffix("_total")
        if series == spec.name or series.startswith(base + "_"):
            return spec.name
    return None


async def test_off_unless_the_port_is_set() -> None:
    server, _ = await create_server(make_settings())
    await server.start()
    try:
        assert server.metrics is None
        assert server.metrics_port == 0
    finally:
        await server.shutdown(grace=0)

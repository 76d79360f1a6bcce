"""The integration hub's domain without gRPC: connectors per record version, calls
through the breaker, which connector each kind gets, request validation and the
per-workspace limit.

The hub runs on what the embedded default builds (a migrated SQLite file, the
in-memory cache, the event bus over the database log) and in-memory breakers on
a clock the test moves. ``Remote`` stands in for an integration's server: the
one part that is not real, since the real connectors need a server to talk to.
tests/platform/resilience/test_breaker.py covers the breaker's own state machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from google.protobuf import duration_pb2

from switchboard.api.integration.v1 import integration_pb2 as pb
from switchboard.integration.connect.connections import Connections, Limits
from switchboard.integration.connect.registry import connector_factory, reserved_handler_ids
from switchboard.integration.kinds.experts import GrpcExpertConnector
from switchboard.integration.kinds.mcp import McpConnector
from switchboard.integration.ports.connectors import (
    Connector,
    ToolNotFound,
    ToolSpec,
    Unreachable,
)
from switchboard.integration.service import IntegrationHub
from switchboard.integration.store import IntegrationRecord, IntegrationStore
from switchboard.platform.cache import Cache
from switchboard.platform.errors import (
    CircuitOpen,
    DeadlineExceeded,
    DependencyUnavailable,
    DestinationBlocked,
    FailedPrecondition,
    InvalidArgument,
    QuotaExceeded,
    SecretUnreadable,
)
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import LocalLog
from switchboard.platform.resilience.breaker import Breakers, BreakerState
from switchboard.platform.security.credentials.secretbox import SecretBox
from switchboard.platform.security.egress import EgressPolicy
from switchboard.platform.security.membership import MembershipStore
from switchboard.platform.security.policy import ALL_SCOPES, AuthMethod, Principal
from switchboard.platform.store.db import open_database
from switchboard.platform.store.models import UserRow
from switchboard.platform.store.outbox import Outbox
from switchboard.platform.store.pagination import PageTokens
from switchboard.platform.values.names import new_id, now
from tests.conftest import CALL_DEADLINE_S, TEST_DATABASE_TIMEOUT_S, make_settings
from tests.infra.clock import FakeClock
from tests.kits.integrationkit import integration_record

pytestmark = pytest.mark.unit

NAME = "workspaces/w/integrations/i"
SECRETS = SecretBox("unit-test-secret")
#: A webhook signing secret: whsec_ and 32 bytes in base64.
WHSEC = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVoxMjM0NTY="


def record(**changes: Any) -> IntegrationRecord:
    return integration_record(**changes)


class Remote:
    """A connector whose calls the test scripts; it records its closing."""

    def __init__(self, credential: str | None) -> None:
        self.credential = credential
        self.closed = asyncio.Event()

    async def probe(self, timeout_s: float) -> None:
        return None

    async def list_tools(self, timeout_s: float) -> list[ToolSpec]:
        return []

    async def call_tool(self, name: str, arguments: Mapping[str, Any], **_: Any) -> Any:
        raise ToolNotFound(name)

    async def close(self) -> None:
        self.closed.set()


class Built:
    """A connector factory that remembers what it built (None for webhooks)."""

    def __init__(self) -> None:
        self.remotes: list[Remote] = []

    def __call__(self, made: IntegrationRecord, credential: str | None) -> Connector | None:
        if made.kind == pb.INTEGRATION_KIND_WEBHOOK:
            return None
        remote = Remote(credential)
        self.remotes.append(remote)
        return remote


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def breakers(clock: FakeClock) -> Breakers:
    return Breakers(failures=2, reset_s=10.0, clock=clock)


@pytest.fixture
async def built(breakers: Breakers) -> AsyncIterator[tuple[Connections, Built]]:
    factory = Built()
    connections = Connections(factory, SECRETS, breakers, Limits(max_call_timeout_s=60.0))
    yield connections, factory
    await connections.close()


# -- connectors, one per record version ---------------------------------------------------


async def test_a_record_keeps_its_connector_until_its_version_changes(
    built: tuple[Connections, Built],
) -> None:
    connections, factory = built
    first = connections.get(record())
    assert connections.get(record()) is first
    assert len(factory.remotes) == 1
    second = connections.get(record(version=2))
    assert second is not first
    # The retired one is closed in the background.
    await asyncio.wait_for(factory.remotes[0].closed.wait(), CALL_DEADLINE_S)
    assert not factory.remotes[1].closed.is_set()


async def test_forget_retires_a_connector_built_for_another_version(
    built: tuple[Connections, Built],
) -> None:
    connections, factory = built
    connections.get(record(version=3))
    assert not connections.forget(NAME, 3)  # the event of the version it was built for
    assert not connections.forget("workspaces/w/integrations/none", None)
    assert connections.forget(NAME, 4)
    await asyncio.wait_for(factory.remotes[0].closed.wait(), CALL_DEADLINE_S)
    connections.get(record(version=3))
    assert len(factory.remotes) == 2  # built afresh
    assert connections.forget(NAME, None)


async def test_the_connector_gets_the_credential_sealed_for_its_integration(
    built: tuple[Connections, Built],
) -> None:
    connections, factory = built
    connections.get(record(credential=SECRETS.seal("token-1", purpose=NAME)))
    assert factory.remotes[0].credential == "token-1"
    # Sealed for another integration: a copied row does not open.
    stolen = SECRETS.seal("token-2", purpose="workspaces/w/integrations/other")
    with pytest.raises(SecretUnreadable):
        connections.get(record(version=2, credential=stolen))


async def test_a_webhook_has_no_connector(built: tuple[Connections, Built]) -> None:
    connections, _ = built
    with pytest.raises(FailedPrecondition, match="webhook that declares no tools"):
        connections.get(record(kind=pb.INTEGRATION_KIND_WEBHOOK))


@pytest.mark.parametrize(("timeout_ms", "seconds"), [(0, 30.0), (1_500, 1.5), (600_000, 60.0)])
def test_a_call_timeout_is_the_record_s_within_the_limit(
    built: tuple[Connections, Built], timeout_ms: int, seconds: float
) -> None:
    connections, _ = built
    assert connections.timeout_s(record(call_timeout_ms=timeout_ms)) == seconds


# -- calls through the breaker ----------------------------------------------------------------


async def unreachable() -> None:
    raise Unreachable("connection refused")


async def missing_tool() -> None:
    raise ToolNotFound("nope")


async def blocked() -> None:
    raise DestinationBlocked("10.0.0.1 is a private address")


async def answer() -> str:
    return "ok"


async def test_unreachable_twice_opens_the_circuit_until_a_trial_succeeds(
    built: tuple[Connections, Built], breakers: Breakers, clock: FakeClock
) -> None:
    connections, _ = built
    for _ in range(2):
        with pytest.raises(DependencyUnavailable) as failed:
            await connections.guarded(record(), unreachable, 5)
        assert failed.value.metadata == {"integration": NAME}
        assert "connection refused" in failed.value.message
    assert breakers.state(NAME) == BreakerState("open", 2, clock.now + 10)
    with pytest.raises(CircuitOpen):
        await connections.guarded(record(), answer, 5)
    clock.advance(10)
    assert await connections.guarded(record(), answer, 5) == "ok"  # the trial
    assert breakers.state(NAME) == BreakerState("closed", 0, None)


async def test_a_call_past_its_timeout_is_a_failure_of_the_integration(
    built: tuple[Connections, Built], breakers: Breakers
) -> None:
    connections, _ = built
    never = asyncio.Event()
    with pytest.raises(DeadlineExceeded, match=r"did not answer within 0\.01 s"):
        await connections.guarded(record(), never.wait, 0.01)
    assert breakers.state(NAME).failures == 1


async def test_an_unknown_tool_is_an_answer_and_a_blocked_address_no_verdict(
    built: tuple[Connections, Built], breakers: Breakers
) -> None:
    connections, _ = built
    with pytest.raises(DependencyUnavailable):
        await connections.guarded(record(), unreachable, 5)
    with pytest.raises(ToolNotFound):
        await connections.guarded(record(), missing_tool, 5)
    assert breakers.state(NAME).failures == 0  # it answered: failures are counted in a row
    with pytest.raises(DependencyUnavailable):
        await connections.guarded(record(), unreachable, 5)
    for _ in range(3):
        with pytest.raises(FailedPrecondition, match="private address"):
            await connections.guarded(record(), blocked, 5)
    # Our egress policy refused: nothing is said about the integration.
    assert breakers.state(NAME) == BreakerState("closed", 1, None)


# -- which connector each kind gets ---------------------------------------------------------


async def test_each_kind_gets_its_connector() -> None:
    settings = make_settings(dispatcher_remote_handlers="billing=127.0.0.1:7000")
    assert reserved_handler_ids(settings.remote_handlers) == {"echo", "llm", "billing"}
    factory = connector_factory(
        settings.integration, EgressPolicy(allow_loopback=True), {}, lambda _: None
    )
    grpc = factory(record(), "token")
    mcp = factory(record(kind=pb.INTEGRATION_KIND_MCP_SERVER, endpoint="http://127.0.0.1/m"), None)
    try:
        assert isinstance(grpc, GrpcExpertConnector)
        assert isinstance(mcp, McpConnector)
        assert factory(record(kind=pb.INTEGRATION_KIND_WEBHOOK), None) is None
    finally:
        for connector in (grpc, mcp):
            if connector is not None:
                await connector.close()


# -- the hub: validation and the per-workspace limit ------------------------------------------


@dataclasses.dataclass
class Hub:
    hub: IntegrationHub
    owner: Principal
    memberships: MembershipStore

    async def workspace(self) -> str:
        workspace_id = new_id()
        await self.memberships.create_workspace(workspace_id, "Team", self.owner.user_id)
        return f"workspaces/{workspace_id}"

    async def create(
        self, parent: str, integration: pb.Integration, integration_id: str = ""
    ) -> pb.Integration:
        request = pb.CreateIntegrationRequest(
            parent=parent, integration=integration, integration_id=integration_id
        )
        return await self.hub.create(self.owner, request)


@pytest.fixture
async def hub(tmp_path: pathlib.Path, breakers: Breakers) -> AsyncIterator[Hub]:
    database = await open_database(
        f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}",
        timeout_s=TEST_DATABASE_TIMEOUT_S,
        migrate=True,
    )
    outbox = Outbox(database)
    log = LocalLog(database, retention=1000, retention_s=3600, memory=100, outbox=outbox)
    bus = EventBus(log, memory=100, outbox=outbox)
    counters = Cache("", timeout_s=1.0, lease_s=1.0)
    await counters.start()
    await bus.start()
    owner = Principal(user_id=new_id(), auth_method=AuthMethod.PASSWORD, scopes=ALL_SCOPES)
    async with database.sessions.begin() as db:
        stamp = now()
        db.add(
            UserRow(
                id=owner.user_id,
                email="owner@example.com",
                display_name="Owner",
                created_at=stamp,
                updated_at=stamp,
                version=1,
            )
        )
    made = IntegrationHub(
        IntegrationStore(database),
        bus,
        counters,
        breakers,
        SECRETS,
        EgressPolicy(allow_loopback=True),
        PageTokens("unit-test-secret"),
        Limits(max_per_workspace=2, max_call_timeout_s=60.0),
        Built(),
        stdio_servers=frozenset({"files"}),
        reserved_handler_ids=frozenset({"llm"}),
    )
    try:
        yield Hub(made, owner, MembershipStore(database))
    finally:
        await made.close()
        await bus.close()
        await counters.close()
        await database.close()


def webhook(**fields: Any) -> pb.Integration:
    given: dict[str, Any] = {
        "kind": pb.INTEGRATION_KIND_WEBHOOK,
        "endpoint": "https://127.0.0.1/hook",
        "credential": WHSEC,
    }
    given.update(fields)
    return pb.Integration(**given)


async def test_a_workspace_holds_at_most_its_limit_of_integrations(hub: Hub) -> None:
    full, other = await hub.workspace(), await hub.workspace()
    for index in range(2):
        made = await hub.create(full, webhook(), f"hook-{index}")
        assert made.name == f"{full}/integrations/hook-{index}"
    with pytest.raises(QuotaExceeded) as refused:
        await hub.create(full, webhook(), "hook-2")
    assert refused.value.subject == "integrations per workspace"
    assert (await hub.create(other, webhook())).name.startswith(f"{other}/integrations/")


async def test_every_invalid_field_is_named_at_once(hub: Hub) -> None:
    parent = await hub.workspace()
    wrong = webhook(
        display_name="x" * 201,
        call_timeout=duration_pb2.Duration(seconds=-1),
        credential="whsec_c2hvcnQ=",
        event_types=["MESSAGE_CREATED", "NOT_A_TYPE"],
    )
    with pytest.raises(InvalidArgument) as refused:
        await hub.create(parent, wrong, "Bad_Id")
    assert [v.field for v in refused.value.violations] == [
        "integration_id",
        "integration.display_name",
        "integration.call_timeout",
        "integration.credential",
        "integration.event_types[1]",
    ]


MCP = pb.INTEGRATION_KIND_MCP_SERVER
GRPC = pb.INTEGRATION_KIND_GRPC_HANDLER


@pytest.mark.parametrize(
    ("integration", "integration_id", "field", "says"),
    [
        (pb.Integration(endpoint="127.0.0.1:1"), "", "integration.kind", "must be"),
        (pb.Integration(kind=GRPC, endpoint="127.0.0.1:1"), "llm", "integration_id", "operator"),
        (webhook(credential=""), "", "integration.credential", "is required for webhooks"),
        (webhook(endpoint="http://127.0.0.1/hook"), "", "integration.endpoint", "https"),
        (webhook(endpoint=""), "", "integration.endpoint", "is required"),
        (
            pb.Integration(kind=MCP, endpoint="https://127.0.0.1/m", event_types=["RUN_UPDATED"]),
            "",
            "integration.event_types",
            "only for webhooks",
        ),
        (pb.Integration(kind=MCP, endpoint="stdio:shell"), "", "integration.endpoint", "stdio"),
    ],
)
async def test_what_each_kind_requires(
    hub: Hub, integration: pb.Integration, integration_id: str, field: str, says: str
) -> None:
    parent = await hub.workspace()
    with pytest.raises(InvalidArgument) as refused:
        await hub.create(parent, integration, integration_id)
    assert [v.field for v in refused.value.violations] == [field]
    assert says in refused.value.violations[0].description


async def test_an_operator_stdio_server_and_a_grpc_expert_are_accepted(hub: Hub) -> None:
    parent = await hub.workspace()
    stdio = await hub.create(parent, pb.Integration(kind=MCP, endpoint="stdio:files"))
    assert stdio.endpoint == "stdio:files"
    expert = await hub.create(parent, pb.Integration(kind=GRPC, endpoint=" 127.0.0.1:1 "), "bot")
    assert (expert.name, expert.endpoint, expert.display_name) == (
        f"{parent}/integrations/bot",
        "127.0.0.1:1",
        "bot",
    )

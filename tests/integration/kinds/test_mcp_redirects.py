"""An MCP server that answers with a redirect is not followed, and its credential goes
nowhere else (issue 42, finding 4).

The endpoint is a recording server (tests/infra/httprecorder.py) whose ``/mcp``
answers every request with a redirect: to another path of the same origin, to
another origin (a second recorder) or to the cloud metadata address. Whatever
the status (301, 302, 307, 308), the connector fails with ``Unreachable``
naming the redirect, only ``/mcp`` was ever asked, and the bearer credential
reached nothing but ``/mcp``.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from switchboard.api.integration.v1 import integration_pb2 as ipb
from switchboard.integration.kinds.mcp import McpConnector
from switchboard.integration.ports.connectors import Unreachable
from switchboard.platform.security.egress import EgressPolicy
from tests.conftest import CALL_DEADLINE_S
from tests.infra.httprecorder import Recorder, Reply, recording
from tests.kits.contextkit import refused
from tests.kits.integrationkit import mcp_hub

pytestmark = pytest.mark.service

LOOPBACK = EgressPolicy(allow_loopback=True)
CREDENTIAL = "s3cret-mcp-credential"
METADATA = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


@pytest.fixture
def endpoint() -> Iterator[Recorder]:
    with recording() as recorder:
        yield recorder


@pytest.fixture
def elsewhere() -> Iterator[Recorder]:
    with recording() as recorder:
        yield recorder


async def _refused_listing(endpoint: Recorder) -> Unreachable:
    """What listing the endpoint's tools with the credential raises (it must raise)."""
    mcp = McpConnector(
        endpoint.url("/mcp"),
        egress=LOOPBACK,
        connect_timeout_s=CALL_DEADLINE_S,
        headers={"Authorization": f"Bearer {CREDENTIAL}"},
    )
    try:
        with pytest.raises(Unreachable) as raised:
            await mcp.list_tools(CALL_DEADLINE_S)
    finally:
        await mcp.close()
    return raised.value


def _target(where: str, endpoint: Recorder, elsewhere: Recorder) -> str:
    return {
        "same-origin": endpoint.url("/mcp/"),
        "other-origin": elsewhere.url("/mcp"),
        "metadata": METADATA,
    }[where]


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize("where", ["same-origin", "other-origin", "metadata"])
async def test_a_redirect_is_not_followed_and_the_credential_stays(
    endpoint: Recorder, elsewhere: Recorder, status: int, where: str
) -> None:
    location = _target(where, endpoint, elsewhere)
    endpoint.routes["/mcp"] = Reply(status, {"location": location})
    # What the same-origin target would answer if it were asked: a working endpoint's reply.
    endpoint.routes["/mcp/"] = Reply(404)
    raised = await _refused_listing(endpoint)
    assert f"HTTP {status}" in str(raised)
    assert "redirect" in str(raised)
    assert CREDENTIAL not in str(raised)
    paths = {seen.path for seen in endpoint.seen}
    assert paths == {"/mcp"}, f"followed to {paths - {'/mcp'}}"
    assert elsewhere.seen == []
    assert all(
        seen.headers.get("authorization") == f"Bearer {CREDENTIAL}" for seen in endpoint.seen
    )


async def test_list_tools_names_the_redirect_without_following_it(
    endpoint: Recorder, elsewhere: Recorder
) -> None:
    endpoint.routes["/mcp"] = Reply(307, {"location": elsewhere.url("/mcp")})
    async with mcp_hub(endpoint.url("/mcp"), CREDENTIAL) as hub:
        stub, world, made = hub.stub, hub.world, hub.integration
        error = await refused(
            stub.ListTools(
                ipb.ListToolsRequest(parent=made), metadata=world.viewer.md, timeout=CALL_DEADLINE_S
            ),
            grpc.StatusCode.UNAVAILABLE,
        )
    assert "HTTP 307" in (error.details() or "")
    assert CREDENTIAL not in (error.details() or "")
    assert {seen.path for seen in endpoint.seen} == {"/mcp"}
    assert elsewhere.seen == []


async def test_an_authorization_challenge_fetches_nothing(
    endpoint: Recorder, elsewhere: Recorder
) -> None:
    """A 401 naming protected-resource metadata elsewhere (MCP's OAuth discovery) is an
    answer, not an address to visit: the hub runs no OAuth flow for a server."""
    metadata = elsewhere.url("/.well-known/oauth-protected-resource")
    endpoint.routes["/mcp"] = Reply(
        401, {"www-authenticate": f'Bearer resource_metadata="{metadata}"'}
    )
    raised = await _refused_listing(endpoint)
    assert "HTTP 401" in str(raised)
    assert {seen.path for seen in endpoint.seen} == {"/mcp"}
    assert elsewhere.seen == []

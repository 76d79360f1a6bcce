"""NaN and infinity over A2A's HTTP+JSON binding, through a real Envoy in front of a real
``switchboard serve``: a number JSON cannot hold never reaches a method.

A bare ``NaN`` or ``Infinity`` is not JSON, and a number past a double's range
(``1e999``) is one protobuf's JSON reader refuses: Envoy's transcoder answers 400 for
either (A2A's ``INVALID_REQUEST``, a body it cannot read) before any method runs. Over
gRPC the server refuses them itself, naming the field
(tests/platform/values/test_nonfinite_numbers.py; docs/contracts.md, "Malformed input").
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.envoy import EnvoyProcess, fronting
from tests.e2e.procs import ServeProcess
from tests.kits.authkit import PASSWORD, unique_email
from tests.kits.contextkit import Caller, context_stub, create_workspace
from tests.kits.dispatchkit import dispatcher_stub

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def serve() -> Iterator[ServeProcess]:
    with ServeProcess("--dev") as process:
        yield process


@pytest.fixture(scope="module")
def envoy(serve: ServeProcess) -> Iterator[EnvoyProcess]:
    yield from fronting(serve.address)


@pytest.fixture
async def agent(envoy: EnvoyProcess) -> tuple[str, Caller]:
    """An echo assistant's A2A tenant, and its workspace's owner, made through the edge."""
    async with aio.insecure_channel(f"127.0.0.1:{envoy.port}") as channel:
        made = await auth_pb2_grpc.AuthServiceStub(channel).Register(
            auth_pb2.RegisterRequest(email=unique_email("nonfinite"), password=PASSWORD),
            timeout=CALL_DEADLINE_S,
        )
        owner = Caller(made.user.name.removeprefix("users/"), made.tokens.access_token)
        workspace = await create_workspace(context_stub(channel), owner, "NaN")
        await dispatcher_stub(channel).CreateAssistant(
            pb.CreateAssistantRequest(
                parent=workspace.name,
                assistant_id="echoer",
                assistant=pb.Assistant(display_name="Echoer", handler="handlers/echo"),
            ),
            metadata=owner.md,
            timeout=CALL_DEADLINE_S,
        )
    return workspace.name.removeprefix("workspaces/") + ".echoer", owner


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=CALL_DEADLINE_S) as client:
        yield client


def _send(data: str, metadata: str = "{}") -> str:
    """A message:send body whose data part is ``data`` and whose metadata ``metadata``,
    spelled as given (json.dumps would refuse NaN, or write it)."""
    message = {"messageId": "m-nonfinite", "role": "ROLE_USER", "parts": [{"text": "hi"}]}
    text = json.dumps({"message": message, "metadata": {}})
    text = text.replace('"metadata": {}', f'"metadata": {metadata}')
    return text.replace('[{"text": "hi"}]', f'[{{"text": "hi"}}, {{"data": {data}}}]')


def _headers(owner: Caller) -> dict[str, str]:
    return {
        "authorization": f"Bearer {owner.token}",
        "content-type": "application/json",
        "a2a-version": "1.0",
    }


@pytest.mark.parametrize(
    ("data", "metadata"),
    [
        ('{"n": NaN}', "{}"),
        ('{"n": Infinity}', "{}"),
        ('{"n": [1, -Infinity]}', "{}"),
        ('{"n": 1e999}', "{}"),
        ('{"n": [1, -1e999]}', "{}"),
        ('{"n": 1}', '{"big": 1e400}'),
    ],
)
async def test_a_number_json_cannot_hold_is_refused_at_the_edge(
    envoy: EnvoyProcess,
    agent: tuple[str, Caller],
    http: httpx.AsyncClient,
    data: str,
    metadata: str,
) -> None:
    """Not JSON (NaN, the infinities), or past a double (1e999): the transcoder refuses
    the body with A2A's INVALID_REQUEST (a body it cannot read), and no method runs."""
    tenant, owner = agent
    answer = await http.post(
        f"{envoy.url}/{tenant}/message:send", content=_send(data, metadata), headers=_headers(owner)
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
    reasons = [(d["domain"], d["reason"]) for d in error["details"] if "reason" in d]
    assert reasons[0] == ("a2a-protocol.org", "INVALID_REQUEST")


async def test_the_largest_double_goes_through(
    envoy: EnvoyProcess, agent: tuple[str, Caller], http: httpx.AsyncClient
) -> None:
    """The same request with finite numbers is served: the refusals above are the numbers'."""
    tenant, owner = agent
    body = json.loads(_send('{"n": 1}', '{"big": 1.7976931348623157e308}'))
    body["message"]["parts"] = [{"text": "hi"}]
    answer = await http.post(
        f"{envoy.url}/{tenant}/message:send", content=json.dumps(body), headers=_headers(owner)
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["task"]["status"]["state"] == "TASK_STATE_COMPLETED"

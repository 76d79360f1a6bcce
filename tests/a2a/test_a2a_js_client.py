"""The official A2A JavaScript SDK against `switchboard serve`, through a real Envoy.

``clients/a2a-js/a2a.mjs`` uses ``@a2a-js/sdk`` (pinned in its package-lock.json) and the
SDK's own gRPC transport, which speaks A2A v1.0 (``lf.a2a.v1.A2AService``), to reach an
echo assistant at Envoy's plain listener (h2c; Envoy routes the A2A service to the server
like every other one). It runs once per module, does what an A2A client does (the
authenticated card, a blocking send, a streamed send, get and list, two cancels, a
stranger's reads) and prints one JSON object; each test checks one part of it against
what the server itself says through Switchboard's own contracts (the run and its stored
answer), and Envoy's counters show that every call went through the edge.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import pytest

from switchboard.api.dispatcher.v1 import dispatcher_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.envoy import EnvoyProcess
from tests.e2e.procs import ROOT, ServeProcess, tool
from tests.e2e.restarts import Caller, register
from tests.kits.authkit import unique_email

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CLIENT: Final = ROOT / "clients" / "a2a-js"
#: The whole program: nine unary calls and one stream, each with a 30 s deadline of its own.
CLIENT_TIMEOUT_S: Final = 120.0
TEXT: Final = "hello from the JavaScript SDK"
SLOW_TEXT: Final = "one slow answer that is cancelled midway"
#: gRPC status codes as the SDK reports them (numbers).
NOT_FOUND: Final = 5
FAILED_PRECONDITION: Final = 9
#: What the client does through Envoy (a2a.mjs): GetExtendedAgentCard, SendMessage, GetTask,
#: ListTasks twice, GetTask (a task that is not there), SendMessage (slow), CancelTask twice,
#: SendMessage (on the ended task), the stranger's GetTask and GetExtendedAgentCard; and one
#: SendStreamingMessage, which Envoy routes to its own cluster (no route timeout, a stream
#: idle timeout).
UNARY_CALLS: Final = 12
STREAMS: Final = 1

Seen = dict[str, Any]


@dataclass(frozen=True)
class Agent:
    """An echo assistant in a workspace of ``owner``'s; ``stranger`` is no member of it."""

    server: ServeProcess
    envoy: EnvoyProcess
    owner: Caller
    owner_token: str
    stranger_token: str
    tenant: str
    workspace: str


def _token(caller: Caller) -> str:
    return dict(caller.md)["authorization"].removeprefix("Bearer ")


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    with (
        ServeProcess("--dev") as server,
        EnvoyProcess(server.address) as envoy,
    ):
        owner_email, stranger_email = unique_email("a2a-js"), unique_email("a2a-js-stranger")
        register(server, owner_email)
        register(server, stranger_email)
        with Caller(server, owner_email) as owner, Caller(server, stranger_email) as stranger:
            workspace = owner.workspace("A2A from JavaScript")
            owner.dispatcher.CreateAssistant(
                dispatcher_pb2.CreateAssistantRequest(
                    parent=workspace,
                    assistant_id="echoer",
                    assistant=dispatcher_pb2.Assistant(
                        display_name="Echoer", handler="handlers/echo"
                    ),
                ),
                metadata=owner.md,
                timeout=CALL_DEADLINE_S,
            )
            yield Agent(
                server=server,
                envoy=envoy,
                owner=owner,
                owner_token=_token(owner),
                stranger_token=_token(stranger),
                tenant=workspace.removeprefix("workspaces/") + ".echoer",
                workspace=workspace,
            )
        assert envoy.terminate() == 0


@pytest.fixture(scope="module")
def seen(agent: Agent) -> Seen:
    """What ``a2a.mjs`` saw, talking to the agent through Envoy."""
    if not (CLIENT / "node_modules" / "@a2a-js" / "sdk").is_dir():
        pytest.fail("clients/a2a-js has no node_modules; run `make tools` (the test command does)")
    done = subprocess.run(
        [
            tool("node"),
            str(CLIENT / "a2a.mjs"),
            "--address",
            f"127.0.0.1:{agent.envoy.port}",
            "--token",
            agent.owner_token,
            "--tenant",
            agent.tenant,
            "--stranger-token",
            agent.stranger_token,
            "--text",
            TEXT,
            "--slow-text",
            SLOW_TEXT,
        ],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        check=False,
        cwd=CLIENT,
    )
    assert done.returncode == 0, done.stderr
    result: Seen = json.loads(done.stdout)
    return result


def _stored_answer(agent: Agent, run_name: str) -> str:
    """The run's answer as Switchboard stores it (GetRun, then the output message)."""
    run = agent.owner.run(run_name)
    assert run.state == dispatcher_pb2.RUN_STATE_SUCCEEDED
    return agent.owner.text_of(run.output_message)


def test_the_card_comes_through_envoy_over_grpc_v1(agent: Agent, seen: Seen) -> None:
    card = seen["card"]
    assert card["name"] == "Echoer"
    # The SDK's transport: gRPC, A2A 1.0 (it sends A2A-Version: 1.0 with every call).
    assert card["transport"] == "GRPC"
    assert card["protocolVersion"] == "1.0"
    # The card names the edge the client came through (the Host Envoy saw), not the
    # server behind it: gRPC at its host:port, HTTP+JSON at its URL.
    edge = f"127.0.0.1:{agent.envoy.port}"
    assert card["interfaces"] == [
        {
            "url": edge,
            "protocolBinding": "GRPC",
            "tenant": agent.tenant,
            "protocolVersion": "1.0",
        },
        {
            "url": f"http://{edge}",
            "protocolBinding": "HTTP+JSON",
            "tenant": agent.tenant,
            "protocolVersion": "1.0",
        },
    ]
    assert card["streaming"] is True
    assert sorted(card["securitySchemes"]) == ["apiKey", "bearer"]
    assert card["extensions"] == [
        "https://switchboard.dev/a2a/extensions/resume/v1",
        "https://switchboard.dev/a2a/extensions/budget/v1",
    ]


def test_every_call_went_through_envoy(agent: Agent, seen: Seen) -> None:
    assert seen["card"]
    stats = agent.envoy.stats("cluster.switchboard")
    assert stats["cluster.switchboard.upstream_rq_total"] == UNARY_CALLS
    assert stats["cluster.switchboard_streams.upstream_rq_total"] == STREAMS


def test_a_blocking_send_answers_with_the_completed_task(agent: Agent, seen: Seen) -> None:
    task = seen["blocking"]
    assert task["state"] == "TASK_STATE_COMPLETED"
    assert task["history"] == [{"role": "ROLE_USER", "text": TEXT}]
    assert task["artifacts"] == ["answer"]
    run_name = task["metadata"]["run"]
    assert run_name.startswith(f"{agent.workspace}/conversations/{task['contextId']}/runs/")
    assert task["id"] == f"{task['contextId']}.{run_name.rsplit('/', 1)[-1]}"
    assert task["metadata"]["assistant"] == f"{agent.workspace}/assistants/echoer"
    # The echo handler's answer: the words, then its signature.
    assert task["answer"] == _stored_answer(agent, run_name)
    assert task["answer"].startswith(f"{TEXT}\n\n(answered by handlers/echo")


def test_a_streamed_send_sends_the_task_then_chunks_then_the_end(agent: Agent, seen: Seen) -> None:
    streamed = seen["streamed"]
    kinds = streamed["kinds"]
    assert kinds[0] == "task"
    assert kinds[-1] == "statusUpdate"
    assert set(kinds) == {"task", "statusUpdate", "artifactUpdate"}
    assert streamed["states"][0] in ("TASK_STATE_SUBMITTED", "TASK_STATE_WORKING")
    assert streamed["states"][-1] == "TASK_STATE_COMPLETED"
    assert "TASK_STATE_WORKING" in streamed["states"]
    # Chunks of one artifact: the first starts it, the rest append, the last says so.
    count = len(streamed["chunks"])
    assert streamed["appends"] == [False] + [True] * (count - 1)
    assert streamed["lastChunks"] == [False] * (count - 1) + [True]
    run_name = seen["got"]["metadata"]["run"]
    assert streamed["text"] == _stored_answer(agent, run_name)
    assert streamed["text"].startswith(f"{TEXT}\n\n(answered by handlers/echo")
    # The resume extension's cursor on every event after the task, strictly increasing
    # (``N``, then ``N.1`` for the final status that follows the answer's last chunk).
    sequences = [
        (int(sequence.partition(".")[0]), int(sequence.partition(".")[2] or 0))
        for sequence in streamed["sequences"]
    ]
    assert len(sequences) == len(kinds) - 1
    assert sequences == sorted(set(sequences))


def test_the_streamed_task_is_got_and_listed(seen: Seen) -> None:
    streamed, got = seen["streamed"], seen["got"]
    assert (got["id"], got["contextId"]) == (streamed["id"], streamed["contextId"])
    assert got["state"] == "TASK_STATE_COMPLETED"
    assert got["answer"] == streamed["text"]
    assert got["history"] == [{"role": "ROLE_USER", "text": TEXT}]
    [listed] = seen["listed"]["tasks"]
    assert listed["id"] == streamed["id"]
    assert listed["state"] == "TASK_STATE_COMPLETED"
    assert listed["answer"] == streamed["text"]
    assert seen["listed"]["nextPageToken"] == ""
    assert seen["listed"]["totalSize"] == 1
    # Without a context: the agent's tasks in every context, counted.
    everywhere = seen["listedAll"]
    assert sorted(everywhere["ids"]) == sorted([streamed["id"], seen["blocking"]["id"]])
    assert everywhere["totalSize"] == 2


def test_a2a_errors_for_a_missing_task_and_text_on_an_ended_one(seen: Seen) -> None:
    missing = seen["missingTask"]["error"]
    assert (missing["name"], missing["code"]) == ("GrpcTaskNotFoundError", NOT_FOUND), missing
    ended = seen["continueFinished"]["error"]
    assert ended["name"] == "GrpcUnsupportedOperationError", ended
    assert ended["code"] == FAILED_PRECONDITION


def test_a_slow_task_is_cancelled_and_a_finished_one_is_not_cancelable(
    agent: Agent, seen: Seen
) -> None:
    slow, cancelled = seen["slow"], seen["cancelled"]
    assert slow["state"] in ("TASK_STATE_SUBMITTED", "TASK_STATE_WORKING")
    assert cancelled["id"] == slow["id"]
    assert cancelled["state"] == "TASK_STATE_CANCELED"
    assert cancelled["statusText"].startswith("CANCELLED: cancelled by an A2A client")
    assert cancelled["answer"] == ""
    run = agent.owner.run(cancelled["metadata"]["run"])
    assert run.state == dispatcher_pb2.RUN_STATE_CANCELLED
    # A task that has ended is not cancelable: the SDK's typed error, from A2A's ErrorInfo.
    error = seen["cancelFinished"]["error"]
    assert error["name"] == "GrpcTaskNotCancelableError", error
    assert error["code"] == FAILED_PRECONDITION
    assert agent.owner.run(seen["blocking"]["metadata"]["run"]).state == (
        dispatcher_pb2.RUN_STATE_SUCCEEDED
    )


def test_a_stranger_learns_nothing(seen: Seen) -> None:
    stranger = seen["stranger"]
    # The task: A2A's TaskNotFoundError; the agent's card: NOT_FOUND with A2A's
    # INVALID_PARAMS (A2A has no error for an agent that is not there; the JavaScript SDK
    # calls that reason RequestMalformedError), as for an agent that does not exist.
    for call, name in (("getTask", "GrpcTaskNotFoundError"), ("card", "GrpcRequestMalformedError")):
        error = stranger[call]["error"]
        assert error["code"] == NOT_FOUND, (call, error)
        assert error["name"] == name, (call, error)
        assert TEXT not in error["message"]

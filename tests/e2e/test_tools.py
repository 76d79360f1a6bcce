"""Real external clients: grpcurl through reflection, grpc-health-probe, and a
Node.js client with stubs loaded from the same protos."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.procs import ROOT, ServeProcess, run, tool
from tests.platform.rpc.test_reflection import EXPECTED

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def serve() -> Iterator[ServeProcess]:
    with ServeProcess("--dev") as process:
        yield process
        assert process.terminate() == 0


def test_grpcurl_lists_every_service(serve: ServeProcess) -> None:
    done = run([tool("grpcurl"), "-plaintext", serve.address, "list"])
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) == EXPECTED


@pytest.mark.parametrize(
    ("service", "rpcs"),
    [
        ("switchboard.api.auth.v1.AuthService", ["Login", "RefreshToken", "GetJwks"]),
        ("switchboard.api.context.v1.ContextService", ["GetContextWindow", "SearchMemoryItems"]),
        ("switchboard.api.dispatcher.v1.DispatcherService", ["WatchRun", "Converse"]),
        ("switchboard.api.integration.v1.IntegrationService", ["InvokeTool"]),
        ("switchboard.api.events.v1.EventService", ["Subscribe", "Stream", "ListEvents"]),
    ],
)
def test_grpcurl_describes_services(serve: ServeProcess, service: str, rpcs: list[str]) -> None:
    done = run([tool("grpcurl"), "-plaintext", serve.address, "describe", service])
    assert done.returncode == 0, done.stderr
    for rpc in rpcs:
        assert f"rpc {rpc}" in done.stdout


def test_grpcurl_describes_a_message_with_its_oneof(serve: ServeProcess) -> None:
    done = run(
        [
            tool("grpcurl"),
            "-plaintext",
            serve.address,
            "describe",
            "switchboard.api.events.v1.Event",
        ]
    )
    assert done.returncode == 0, done.stderr
    assert "oneof payload" in done.stdout
    assert (
        ".switchboard.api.context.v1.Message"
        in run(
            [
                tool("grpcurl"),
                "-plaintext",
                serve.address,
                "describe",
                "switchboard.api.events.v1.MessageCreated",
            ]
        ).stdout
    )


def test_grpcurl_sees_rich_error_details(serve: ServeProcess) -> None:
    done = run(
        [
            tool("grpcurl"),
            "-plaintext",
            "-d",
            '{"email": "nope", "password": "short"}',
            serve.address,
            "switchboard.api.auth.v1.AuthService/Register",
        ]
    )
    assert done.returncode != 0
    assert "Code: InvalidArgument" in done.stderr
    assert "type.googleapis.com/google.rpc.BadRequest" in done.stderr
    assert "ERROR_REASON_INVALID_ARGUMENT" in done.stderr


def _grpcurl(
    serve: ServeProcess,
    method: str,
    data: str | None = None,
    *,
    access: str = "",
    options: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """grpcurl -plaintext against ``serve``, with an optional body and bearer token."""
    command = [tool("grpcurl"), "-plaintext", *options]
    if access:
        command += ["-H", f"authorization: Bearer {access}"]
    if data is not None:
        command += ["-d", data]
    return run([*command, serve.address, method])


def test_grpcurl_signs_up_and_calls_with_a_bearer_token(serve: ServeProcess) -> None:
    registered = _grpcurl(
        serve,
        "switchboard.api.auth.v1.AuthService/Register",
        '{"email": "curl@example.com", "password": "tracing the wire 123"}',
    )
    assert registered.returncode == 0, registered.stderr
    access = json.loads(registered.stdout)["tokens"]["access_token"]
    me = _grpcurl(serve, "switchboard.api.auth.v1.AuthService/GetPrincipal", access=access)
    assert me.returncode == 0, me.stderr
    assert json.loads(me.stdout)["user"]["email"] == "curl@example.com"
    anonymous = _grpcurl(serve, "switchboard.api.auth.v1.AuthService/GetPrincipal")
    assert "Code: Unauthenticated" in anonymous.stderr
    assert "ERROR_REASON_UNAUTHENTICATED" in anonymous.stderr


def test_grpcurl_lists_and_subscribes_to_events(serve: ServeProcess) -> None:
    registered = _grpcurl(
        serve,
        "switchboard.api.auth.v1.AuthService/Register",
        '{"email": "events@example.com", "password": "tracing the wire 123"}',
    )
    assert registered.returncode == 0, registered.stderr
    body = json.loads(registered.stdout)
    access = body["tokens"]["access_token"]
    scope = json.dumps({"scopes": [{"user": body["user"]["name"]}]})
    created = _grpcurl(
        serve,
        "switchboard.api.auth.v1.AuthService/CreateApiKey",
        '{"display_name": "for events"}',
        access=access,
    )
    assert created.returncode == 0, created.stderr
    key_name = json.loads(created.stdout)["api_key"]["name"]
    listed = _grpcurl(
        serve, "switchboard.api.events.v1.EventService/ListEvents", scope, access=access
    )
    assert listed.returncode == 0, listed.stderr
    events = json.loads(listed.stdout)["events"]
    assert [e["security"].get("api_key") for e in events if e["type"] == "EVENT_TYPE_SECURITY"][
        -1
    ] == key_name
    # A stream never ends by itself: -max-time bounds it, and what arrived is printed.
    replay = json.dumps({**json.loads(scope), "after_cursor": events[0]["cursor"]})
    streamed = _grpcurl(
        serve,
        "switchboard.api.events.v1.EventService/Subscribe",
        replay,
        access=access,
        options=("-max-time", "3"),
    )
    assert "DeadlineExceeded" in streamed.stderr, streamed.stderr
    assert '"heartbeat"' in streamed.stdout
    assert key_name in streamed.stdout, "the replay includes the API key event"


def test_grpcurl_runs_the_readme_context_workflow(serve: ServeProcess) -> None:
    """The README's "Conversations and context" commands, as grpcurl sends them."""
    registered = _grpcurl(
        serve,
        "switchboard.api.auth.v1.AuthService/Register",
        '{"email": "context@example.com", "password": "tracing the wire 123"}',
    )
    assert registered.returncode == 0, registered.stderr
    access = json.loads(registered.stdout)["tokens"]["access_token"]

    def call(method: str, body: dict[str, object]) -> dict[str, Any]:
        done = _grpcurl(
            serve,
            f"switchboard.api.context.v1.ContextService/{method}",
            json.dumps(body),
            access=access,
        )
        assert done.returncode == 0, (method, done.stderr)
        result: dict[str, Any] = json.loads(done.stdout or "{}")
        return result

    call("CreateWorkspace", {"workspace_id": "acme", "workspace": {"display_name": "Acme"}})
    conversation = call(
        "CreateConversation", {"parent": "workspaces/acme", "conversation": {"title": "Trip"}}
    )["conversation"]["name"]
    message = call(
        "AppendMessage",
        {
            "parent": conversation,
            "message": {
                "role": "MESSAGE_ROLE_USER",
                "parts": [{"text": "Book a table for @ana on 2026-12-24"}],
            },
        },
    )["message"]
    memory = call(
        "CreateMemoryItem",
        {
            "parent": "workspaces/acme",
            "memory_item": {
                "kind": "MEMORY_KIND_PREFERENCE",
                "content": "Ana is vegetarian",
                "pinned": True,
            },
        },
    )["memory_item"]
    window = call("GetContextWindow", {"conversation": conversation, "token_budget": 4000})[
        "window"
    ]
    included = window["included"]
    assert included[0]["memory_item"]["name"] == memory["name"]
    assert included[0]["reason"] == "CONTEXT_ITEM_REASON_PINNED"
    assert included[-1]["message"]["name"] == message["name"]
    assert included[-1]["reason"] == "CONTEXT_ITEM_REASON_RECENT"
    # The entities of the message (the mention and the date) were remembered, and
    # rank as relevant to it.
    entities = {
        item["memory_item"]["content"]
        for item in included
        if item.get("memory_item", {}).get("kind") == "MEMORY_KIND_ENTITY"
    }
    assert entities == {"mention: ana", "date: 2026-12-24"}
    found = call("SearchMemoryItems", {"parent": "workspaces/acme", "query": "vegetarian food"})
    assert [r["memory_item"]["name"] for r in found["results"]] == [memory["name"]]
    pruned = call("PruneConversation", {"conversation": conversation, "keep_last_messages": 50})
    assert pruned.get("pruned_message_count", 0) == 0
    assert pruned["kept_message_count"] == 1


def test_grpcurl_runs_the_readme_dispatcher_workflow(serve: ServeProcess) -> None:
    """The README's "Sending messages: runs" commands, as grpcurl sends them."""
    registered = _grpcurl(
        serve,
        "switchboard.api.auth.v1.AuthService/Register",
        '{"email": "runs@example.com", "password": "watching the answers 123"}',
    )
    assert registered.returncode == 0, registered.stderr
    access = json.loads(registered.stdout)["tokens"]["access_token"]

    def call(method: str, body: dict[str, object]) -> subprocess.CompletedProcess[str]:
        service = "context" if method.endswith(("Workspace", "Conversation")) else "dispatcher"
        pascal = "ContextService" if service == "context" else "DispatcherService"
        done = _grpcurl(
            serve,
            f"switchboard.api.{service}.v1.{pascal}/{method}",
            json.dumps(body),
            access=access,
        )
        assert done.returncode == 0, (method, done.stderr)
        return done

    call("CreateWorkspace", {"workspace_id": "runs", "workspace": {"display_name": "Runs"}})
    created = call(
        "CreateConversation", {"parent": "workspaces/runs", "conversation": {"title": "Q"}}
    )
    conversation = json.loads(created.stdout)["conversation"]["name"]
    body = {
        "conversation": conversation,
        "message": {"parts": [{"text": "hello there"}]},
        "request_id": "msg-1",
    }
    sent = json.loads(call("SendMessage", body).stdout)
    again = json.loads(call("SendMessage", body).stdout)
    run = sent["run"]["name"]
    assert again["run"]["name"] == run
    watched = call("WatchRun", {"name": run}).stdout
    # grpcurl prints one JSON object per frame.
    frames = [json.loads(chunk) for chunk in watched.replace("}\n{", "}\x00{").split("\x00")]
    deltas = "".join(f["update"]["delta"]["text"] for f in frames if "delta" in f["update"])
    assert deltas.startswith("hello there")
    assert "answered by handlers/echo" in deltas
    assert frames[-1]["update"]["state_change"]["run"]["state"] == "RUN_STATE_SUCCEEDED"
    cancelled = json.loads(call("CancelRun", {"name": run, "reason": "stop"}).stdout)
    assert cancelled["run"]["state"] == "RUN_STATE_SUCCEEDED"  # it had already finished
    handlers = json.loads(call("ListHandlers", {"parent": "workspaces/runs"}).stdout)
    assert [h["name"] for h in handlers["handlers"]] == ["handlers/echo"]


def test_grpcurl_health_check(serve: ServeProcess) -> None:
    done = run([tool("grpcurl"), "-plaintext", serve.address, "grpc.health.v1.Health/Check"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"status": "SERVING"}


@pytest.mark.parametrize("service", ["", "switchboard.api.dispatcher.v1.DispatcherService"])
def test_grpc_health_probe_passes(serve: ServeProcess, service: str) -> None:
    done = run([tool("grpc-health-probe"), "-addr", serve.address, "-service", service])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "status: SERVING" in done.stdout + done.stderr


def test_grpc_health_probe_fails_for_unknown_service(serve: ServeProcess) -> None:
    done = run([tool("grpc-health-probe"), "-addr", serve.address, "-service", "no.Such"])
    # grpc-health-probe: 3 = the health RPC failed (NOT_FOUND for an unknown service).
    assert done.returncode == 3, done.stdout + done.stderr


def test_node_client_calls_health_and_an_rpc(serve: ServeProcess) -> None:
    node_dir = ROOT / "clients" / "node"
    if not (node_dir / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("Node client dependencies missing; run `make tools`")
    done = run([tool("node"), str(node_dir / "smoke.mjs"), serve.address])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["health"] == {
        "": "SERVING",
        "switchboard.api.auth.v1.AuthService": "SERVING",
    }
    jwks = result["getJwks"]
    assert jwks["ok"] is True
    assert [k["kty"] for k in jwks["response"]["keys"]] == ["OKP"]
    assert result["register"]["ok"] is True
    assert result["getPrincipal"] == {
        "ok": True,
        "user": result["register"]["user"],
        "email": result["getPrincipal"]["email"],
    }
    assert result["getPrincipal"]["email"].startswith("node-")
    anonymous = result["anonymous"]
    assert anonymous["ok"] is False
    assert anonymous["codeName"] == "UNAUTHENTICATED"
    assert anonymous["errorInfo"]["reason"] == "ERROR_REASON_UNAUTHENTICATED"
    assert anonymous["errorInfo"]["domain"] == "switchboard.dev"
    assert len(anonymous["errorInfo"]["metadata"]["request_id"]) == 32


def test_node_client_follows_and_resumes_an_event_stream(serve: ServeProcess) -> None:
    node_dir = ROOT / "clients" / "node"
    if not (node_dir / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("Node client dependencies missing; run `make tools`")
    done = run([tool("node"), str(node_dir / "events.mjs"), serve.address])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    event = result["event"]
    assert event["type"] == "EVENT_TYPE_SECURITY"
    assert event["kind"] == "SECURITY_EVENT_KIND_API_KEY_CREATED"
    assert event["apiKey"] == result["apiKey"]
    assert _position(event["cursor"]) > _position(result["liveFrom"])
    assert result["replayedId"] == event["id"]
    assert result["replayedFirstFrame"] == "heartbeat"


def _position(cursor: str) -> tuple[int, int]:
    major, _, minor = cursor.partition("-")
    return int(major), int(minor)


def test_node_client_converses_sends_and_cancels_runs(serve: ServeProcess) -> None:
    """A native client in another language on the bidirectional Converse stream."""
    done = run([tool("node"), str(ROOT / "clients" / "node" / "runs.mjs"), serve.address])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    first = result["first"]
    assert first["sequences"] == list(range(1, len(first["sequences"]) + 1))
    assert first["answer"].startswith("hello from node")
    assert "answered by handlers/echo" in first["answer"]
    assert first["state"] == "RUN_STATE_SUCCEEDED"
    cancelled = result["cancelled"]
    assert cancelled["ack"] == "stop"
    assert cancelled["ackState"] == "RUN_STATE_CANCELLED"
    assert cancelled["state"] == "RUN_STATE_CANCELLED"
    assert "from node" in cancelled["error"]

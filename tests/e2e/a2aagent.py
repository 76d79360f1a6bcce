"""A small A2A agent built with the official SDK's server side, run as a process by tests.

It serves its Agent Card over HTTP at ``/.well-known/agent-card.json`` and the
A2A service over gRPC (``--grpc-port``, 0: any free port) or, with
``--jsonrpc-only``, over JSON-RPC at ``/a2a`` on the HTTP port and nothing
else. The first stdout line is ``LISTENING <http port> <grpc port or 0>``.

What it does depends on the message's first word:

- ``ask``: asks for the user's name (input-required); the next message on the
  task is the name, answered ``hello <name>``;
- ``hold``: streams ``first half``, then waits until ``POST /release`` before
  streaming `` second half`` (a run that is mid-stream for as long as a test needs);
- ``fail``: fails the task with the status message ``cannot do that``;
- ``data``: an answer with a data part;
- anything else: ``you said`` and the text, in chunks.

Every execute, cancel and subscribe is written to ``--side-effects`` as a line,
so a test can see what reached the agent; each execute is preceded by a line
``message <task id> <message id>`` (the id a client dedupes by) and one line
``file <json>`` per file part of the message (its ``filename``, ``media_type``,
and ``size`` and ``sha256`` of its bytes or its ``url``). With ``--token`` a message without
``authorization: Bearer <token>`` is rejected (the task ends ``rejected``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from a2a.helpers.proto_helpers import new_task_from_user_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler, GrpcHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import a2a_pb2 as a2a
from a2a.types import a2a_pb2_grpc
from grpc import aio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def _authorization(context: RequestContext) -> str:
    """The caller's ``authorization``, from the gRPC metadata or the HTTP headers."""
    state = context.call_context.state
    if "grpc_context" in state:
        metadata = dict(state["grpc_context"].invocation_metadata() or ())
        return str(metadata.get("authorization", ""))
    return str(state.get("headers", {}).get("authorization", ""))


class Agent(AgentExecutor):
    def __init__(self, side_effects: Path, token: str) -> None:
        self._side_effects = side_effects
        self._token = token
        self.gate = asyncio.Event()

    def record(self, line: str) -> None:
        with self._side_effects.open("a", encoding="utf-8") as out:
            out.write(line + "\n")

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id is not None
        assert context.context_id is not None
        text = context.get_user_input()
        assert context.message is not None
        self.record(f"message {context.task_id} {context.message.message_id}")
        for part in context.message.parts:
            kind = part.WhichOneof("content")
            if kind not in ("raw", "url"):
                continue
            seen: dict[str, object] = {"filename": part.filename, "media_type": part.media_type}
            if kind == "raw":
                seen.update(size=len(part.raw), sha256=hashlib.sha256(part.raw).hexdigest())
            else:
                seen["url"] = part.url
            self.record(f"file {json.dumps(seen, sort_keys=True)}")
        self.record(f"execute {context.task_id} {context.context_id} {text}")
        task = context.current_task
        if task is None:
            assert context.message is not None
            task = new_task_from_user_message(context.message)
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        if self._token and _authorization(context) != f"Bearer {self._token}":
            await updater.reject(updater.new_agent_message([a2a.Part(text="no valid token")]))
            return
        if task.status.state == a2a.TASK_STATE_INPUT_REQUIRED:
            await updater.start_work()
            await updater.add_artifact([a2a.Part(text=f"hello {text}")], artifact_id="answer")
            await updater.complete()
            return
        word = (text.split() or [""])[0]
        await updater.start_work(updater.new_agent_message([a2a.Part(text="thinking")]))
        if word == "ask":
            question = updater.new_agent_message([a2a.Part(text="What is your name?")])
            await updater.requires_input(question)
            return
        if word == "fail":
            await updater.failed(updater.new_agent_message([a2a.Part(text="cannot do that")]))
            return
        if word == "hold":
            await updater.add_artifact([a2a.Part(text="first half")], artifact_id="answer")
            self.record(f"holding {context.task_id}")
            await self.gate.wait()
            await updater.add_artifact(
                [a2a.Part(text=" second half")], artifact_id="answer", append=True
            )
            await updater.complete()
            return
        if word == "data":
            value = a2a.Part()
            value.data.struct_value.update({"temperature": 21})
            await updater.add_artifact([a2a.Part(text="the weather"), value], artifact_id="answer")
            await updater.complete()
            return
        await updater.add_artifact([a2a.Part(text="you said")], artifact_id="answer")
        await updater.add_artifact(
            [a2a.Part(text=f" {text}")], artifact_id="answer", append=True, last_chunk=True
        )
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id is not None
        assert context.context_id is not None
        self.record(f"cancel {context.task_id}")
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


class _Subscriptions(GrpcHandler):
    """Records each SubscribeToTask, so a test sees that a stream was resumed."""

    def __init__(self, record: Callable[[str], None], *args: Any) -> None:
        super().__init__(*args)
        self._record = record

    async def SubscribeToTask(
        self, request: a2a.SubscribeToTaskRequest, context: aio.ServicerContext[Any, Any]
    ) -> Any:
        self._record(f"subscribe {request.id}")
        async for event in super().SubscribeToTask(request, context):
            yield event


def _bind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # As gRPC does: a restarted agent binds its port again although connections
    # of the killed one linger.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    # Listening before LISTENING is printed: a client that comes at once waits in the
    # backlog until the server accepts, rather than being refused.
    sock.listen(128)
    return sock


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--jsonrpc-only", action="store_true")
    parser.add_argument("--advertise-grpc", default="", help="the gRPC url the card names")
    parser.add_argument("--side-effects", type=Path, required=True)
    parser.add_argument("--token", default="")
    args = parser.parse_args()

    http_sock = _bind(args.port)
    http_port = http_sock.getsockname()[1]
    agent = Agent(args.side_effects, args.token)
    interfaces: list[a2a.AgentInterface] = []
    grpc_server: aio.Server | None = None
    grpc_port = 0
    if not args.jsonrpc_only:
        grpc_server = aio.server()
        grpc_port = grpc_server.add_insecure_port(f"127.0.0.1:{args.grpc_port}")
        url = args.advertise_grpc or f"127.0.0.1:{grpc_port}"
        interfaces.append(
            a2a.AgentInterface(url=url, protocol_binding="GRPC", protocol_version="1.0")
        )
    else:
        url = f"http://127.0.0.1:{http_port}/a2a"
        interfaces.append(
            a2a.AgentInterface(url=url, protocol_binding="JSONRPC", protocol_version="1.0")
        )
    card = a2a.AgentCard(
        name="Test agent",
        description="Streams text and can ask for input.",
        version="1.0.0",
        supported_interfaces=interfaces,
        capabilities=a2a.AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[
            a2a.AgentSkill(id="talk", name="Talk", description="Answers.", tags=["test", "chat"])
        ],
    )
    handler = DefaultRequestHandler(agent, InMemoryTaskStore(), card)
    if grpc_server is not None:
        a2a_pb2_grpc.add_A2AServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _Subscriptions(agent.record, handler), grpc_server
        )
        await grpc_server.start()

    async def release(request: Request) -> Response:
        agent.gate.set()
        return JSONResponse({"released": True})

    routes = [*create_agent_card_routes(card), Route("/release", release, methods=["POST"])]
    if args.jsonrpc_only:
        routes.extend(create_jsonrpc_routes(handler, "/a2a"))
    app = Starlette(routes=routes)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    print(f"LISTENING {http_port} {grpc_port}", flush=True)
    await server.serve(sockets=[http_sock])


if __name__ == "__main__":
    asyncio.run(main())

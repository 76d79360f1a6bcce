"""Switchboard's Python client in one program: sign in, ask, stream, follow.

    SB_PASSWORD='a long passphrase 42' \\
        .venv/bin/python examples/python_client.py --target 127.0.0.1:50051 \\
        --email ada@example.com --register --tokens ~/.switchboard-tokens.json "hello there"

It signs in (``--register`` creates the account first; with ``--tokens`` the
session is kept in that file and the next run continues it without a
password), creates a workspace and a conversation unless ``--conversation``
names one, follows the conversation's events, sends the message to the
``echo`` handler (``--handler``), prints the answer as it streams, and exits
once the answer's own event has arrived. Every line on stdout is one JSON
object (``kind``: ``conversation``, ``event``, ``delta``, ``answer``), so a
program, or a test, can read it.

It uses only ``switchboard.client`` (docs/python-client.md), which speaks the
public contracts: any Switchboard deployment, one process or the mesh behind
Envoy (``--tls`` for a TLS endpoint).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from google.protobuf import json_format

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.context.v1 import context_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.client import AlreadyExists, Client, SignedOut


def emit(kind: str, **fields: object) -> None:
    print(json.dumps({"kind": kind, **fields}), flush=True)


class TokenFile:
    """Keeps the session's token pair in a file only its owner can read."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> auth_pb2.TokenPair | None:
        if not self.path.exists():
            return None
        return json_format.Parse(self.path.read_text(), auth_pb2.TokenPair())

    def save(self, pair: auth_pb2.TokenPair | None) -> None:
        if pair is None:
            self.path.unlink(missing_ok=True)
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json_format.MessageToJson(pair))


async def sign_in(client: Client, args: argparse.Namespace, tokens: TokenFile | None) -> None:
    saved = tokens.load() if tokens else None
    if saved is not None:
        client.use_tokens(saved)
        try:
            await client.auth.GetPrincipal(auth_pb2.GetPrincipalRequest())
            return
        except SignedOut:
            pass  # the saved session is over: sign in with the password
    password = os.environ.get("SB_PASSWORD", "")
    if not password:
        raise SystemExit("set SB_PASSWORD")
    if args.register:
        try:
            await client.register(args.email, password)
            return
        except AlreadyExists:
            pass  # registered by an earlier run
    await client.sign_in(args.email, password)


async def conversation_of(client: Client, args: argparse.Namespace) -> str:
    if args.conversation:
        return str(args.conversation)
    workspace = await client.context.CreateWorkspace(
        context_pb2.CreateWorkspaceRequest(workspace=context_pb2.Workspace(display_name="Example"))
    )
    created = await client.context.CreateConversation(
        context_pb2.CreateConversationRequest(
            parent=workspace.workspace.name,
            conversation=context_pb2.Conversation(title="From the Python client"),
        )
    )
    return created.conversation.name


async def main(args: argparse.Namespace, tokens: TokenFile | None) -> None:
    async with Client(args.target, tls=args.tls, on_tokens=tokens.save if tokens else None) as c:
        await sign_in(c, args, tokens)
        conversation = await conversation_of(c, args)
        emit("conversation", name=conversation)

        async with c.follow([conversation], types=["MESSAGE_CREATED"]) as events:
            await events.ready()
            run = await c.send(conversation, args.message, handler=args.handler)
            async with c.watch(run) as watch:
                async for update in watch:
                    if update.HasField("delta"):
                        emit("delta", text=update.delta.text)
            final = watch.run
            if final is None or not final.output_message:
                raise SystemExit(f"the run ended without an answer: {final}")
            emit("answer", run=final.name, message=final.output_message)
            async for event in events:
                emit(
                    "event",
                    type=events_pb2.EventType.Name(event.type),
                    message=event.message_created.message.name,
                    cursor=events.cursor,
                )
                if event.message_created.message.name == final.output_message:
                    break


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("message", help="what to send")
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of Switchboard")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's roots")
    parser.add_argument("--email", required=True)
    parser.add_argument("--register", action="store_true", help="create the account first")
    parser.add_argument("--tokens", help="file that keeps the session between runs")
    parser.add_argument("--conversation", help="an existing conversation's name")
    parser.add_argument("--handler", default="echo", help="handler to answer (echo, llm, ...)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    kept = TokenFile(Path(arguments.tokens).expanduser()) if arguments.tokens else None
    asyncio.run(main(arguments, kept))

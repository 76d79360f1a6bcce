"""A server stopped and started again as the same deployment, and a caller beside it.

A client's resume is only tested for real when the server it talks to goes away and
comes back as the same deployment: on the same port, with the same database file, the
same secrets and signing key (given as settings, as a deployment gives them, rather
than dev mode's) and the same dispatcher instance id (a restarted dispatcher takes
back the runs of its id). ``restart_env`` is those settings; ``restarted`` starts the
second process. ``Caller`` does what a test does beside the client under test, through
the Python stubs: the same user, in another session.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Final

import grpc

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2, context_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ServeProcess, shared_secrets
from tests.kits.authkit import PASSWORD, bearer

#: Heartbeats often enough that cursors also advance by heartbeats in tests.
HEARTBEAT_S: Final = "0.5"


def restart_env(directory: Path, instance_id: str, **extra: str) -> dict[str, str]:
    """What a process and its restart share: secrets, database, dispatcher id."""
    return {
        **shared_secrets(directory),
        "SWITCHBOARD_DATABASE_URL": f"sqlite+aiosqlite:///{directory}/switchboard.db",
        "SWITCHBOARD_INSTANCE_ID": instance_id,
        "SWITCHBOARD_EVENTS_HEARTBEAT_S": HEARTBEAT_S,
        "SWITCHBOARD_DISPATCHER_HEARTBEAT_S": HEARTBEAT_S,
        # Open streams hold a SIGTERM for the whole grace: keep it short.
        "SWITCHBOARD_SHUTDOWN_GRACE_S": "2",
        **extra,
    }


def restarted(stack: ExitStack, server: ServeProcess, env: dict[str, str]) -> ServeProcess:
    """The server started again on the port it had (free again: it was stopped)."""
    return stack.enter_context(ServeProcess("--port", str(server.port), env=env))


def position(cursor: str) -> tuple[int, ...]:
    """The log position of a cursor of the embedded log (`<sequence>-<n>`), for ordering
    checks in tests only: clients treat cursors as opaque."""
    return tuple(int(part) for part in cursor.split("-"))


def register(server: ServeProcess, email: str) -> str:
    """A new user with the test password; its name."""
    with grpc.insecure_channel(server.address) as channel:
        response = auth_pb2_grpc.AuthServiceStub(channel).Register(
            auth_pb2.RegisterRequest(email=email, password=PASSWORD, display_name="Restarts"),
            timeout=CALL_DEADLINE_S,
        )
    return response.user.name


class Caller:
    """What the tests do through the Python stubs: the same user, another session."""

    def __init__(self, server: ServeProcess, email: str) -> None:
        self._channel = grpc.insecure_channel(server.address)
        response = auth_pb2_grpc.AuthServiceStub(self._channel).Login(
            auth_pb2.LoginRequest(
                password=auth_pb2.PasswordCredential(email=email, password=PASSWORD)
            ),
            timeout=CALL_DEADLINE_S,
        )
        self.md = bearer(response.tokens.access_token)
        self.user = response.user.name
        self.auth = auth_pb2_grpc.AuthServiceStub(self._channel)
        self.context = context_pb2_grpc.ContextServiceStub(self._channel)
        self.dispatcher = dispatcher_pb2_grpc.DispatcherServiceStub(self._channel)
        self.events = events_pb2_grpc.EventServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Caller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def workspace(self, display_name: str = "Restarts") -> str:
        """A new workspace of this user's; its name."""
        return self.context.CreateWorkspace(
            context_pb2.CreateWorkspaceRequest(
                workspace=context_pb2.Workspace(display_name=display_name)
            ),
            metadata=self.md,
            timeout=CALL_DEADLINE_S,
        ).workspace.name

    def conversation(self) -> str:
        """A new workspace with one conversation; the conversation's name."""
        return self.context.CreateConversation(
            context_pb2.CreateConversationRequest(
                parent=self.workspace(), conversation=context_pb2.Conversation(title="Restarts")
            ),
            metadata=self.md,
            timeout=CALL_DEADLINE_S,
        ).conversation.name

    def append(self, conversation: str, text: str) -> str:
        """Append a user message (one MESSAGE_CREATED event); its name."""
        response = self.context.AppendMessage(
            context_pb2.AppendMessageRequest(
                parent=conversation,
                message=context_pb2.Message(
                    role=context_pb2.MESSAGE_ROLE_USER, parts=[context_pb2.ContentPart(text=text)]
                ),
            ),
            metadata=self.md,
            timeout=CALL_DEADLINE_S,
        )
        return response.message.name

    def event_elsewhere(self) -> str:
        """Cause an event outside any conversation (CreateApiKey: a security event in the
        user's scope); its cursor."""
        key = self.auth.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(display_name="elsewhere"),
            metadata=self.md,
            timeout=CALL_DEADLINE_S,
        ).api_key.name
        listed = self.events.ListEvents(
            events_pb2.ListEventsRequest(scopes=[events_pb2.Scope(user=self.user)], page_size=500),
            metadata=self.md,
            timeout=CALL_DEADLINE_S,
        ).events
        return next(e.cursor for e in listed if e.security.api_key == key)

    def logged(self, conversation: str, after_cursor: str) -> list[events_pb2.Event]:
        """Every event the log holds for the conversation after the cursor, in log order."""
        events: list[events_pb2.Event] = []
        page_token = ""
        while True:
            page = self.events.ListEvents(
                events_pb2.ListEventsRequest(
                    scopes=[events_pb2.Scope(conversation=conversation)],
                    after_cursor=after_cursor,
                    page_size=500,
                    page_token=page_token,
                ),
                metadata=self.md,
                timeout=CALL_DEADLINE_S,
            )
            events.extend(page.events)
            page_token = page.next_page_token
            if not page_token:
                return events

    def run(self, name: str) -> dispatcher_pb2.Run:
        return self.dispatcher.GetRun(
            dispatcher_pb2.GetRunRequest(name=name), metadata=self.md, timeout=CALL_DEADLINE_S
        ).run

    def text_of(self, message: str) -> str:
        stored = self.context.GetMessage(
            context_pb2.GetMessageRequest(name=message), metadata=self.md, timeout=CALL_DEADLINE_S
        ).message
        return "".join(part.text for part in stored.parts)

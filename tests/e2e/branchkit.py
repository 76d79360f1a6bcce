"""What the clients' branch tests (Go, Node) read and set up through the contracts (the
Python stubs): a conversation shared by an owner, an editor and a viewer, a branch read
whole, the conversations of a workspace (forks among them), and the tombstones that
deletions leave in the event log."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from switchboard.api.context.v1 import context_pb2
from switchboard.api.events.v1 import events_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.procs import ServeProcess
from tests.e2e.restarts import Caller, register
from tests.kits.authkit import unique_email


@dataclass(frozen=True)
class Shared:
    """A conversation in a workspace of ``owner``'s, where ``editor`` is an editor and
    ``viewer`` a viewer (the emails of registered users)."""

    conversation: str
    owner: str
    editor: str
    viewer: str


def new_conversation(python: Caller, title: str) -> str:
    """A conversation in a new workspace of the caller's; its name."""
    return python.context.CreateConversation(
        context_pb2.CreateConversationRequest(
            parent=python.workspace(title), conversation=context_pb2.Conversation(title=title)
        ),
        metadata=python.md,
        timeout=CALL_DEADLINE_S,
    ).conversation.name


def shared_conversation(server: ServeProcess, prefix: str) -> Shared:
    owner, editor, viewer = (unique_email(f"{prefix}-{who}") for who in ("owner", "ed", "view"))
    register(server, owner)
    members = {
        register(server, editor): context_pb2.WORKSPACE_ROLE_EDITOR,
        register(server, viewer): context_pb2.WORKSPACE_ROLE_VIEWER,
    }
    with Caller(server, owner) as python:
        conversation = new_conversation(python, "Shared branches")
        workspace = conversation.partition("/conversations/")[0]
        for user, role in members.items():
            python.context.AddWorkspaceMember(
                context_pb2.AddWorkspaceMemberRequest(parent=workspace, user=user, role=role),
                metadata=python.md,
                timeout=CALL_DEADLINE_S,
            )
    return Shared(conversation, owner, editor, viewer)


def held_conversation(python: Caller, name: str) -> context_pb2.Conversation:
    return python.context.GetConversation(
        context_pb2.GetConversationRequest(name=name), metadata=python.md, timeout=CALL_DEADLINE_S
    ).conversation


def read_branch(
    python: Caller, conversation: str, branch: int = 0
) -> tuple[int, list[context_pb2.Message]]:
    """The branch read (0: the active one) and its messages in order, every page."""
    messages: list[context_pb2.Message] = []
    page_token = ""
    read = branch
    while True:
        # Every page asks what the first did (a page token is only good for the request
        # it came from); the token keeps the later pages on the branch the first read.
        page = python.context.ListMessages(
            context_pb2.ListMessagesRequest(
                parent=conversation, branch=branch, page_size=2, page_token=page_token
            ),
            metadata=python.md,
            timeout=CALL_DEADLINE_S,
        )
        messages.extend(page.messages)
        read = read or page.branch
        assert page.branch == read, (page.branch, read)
        page_token = page.next_page_token
        if not page_token:
            return read, messages


def workspace_conversations(python: Caller, conversation: str) -> set[str]:
    """The names of the conversations in the workspace of ``conversation``, every page."""
    workspace = conversation.partition("/conversations/")[0]
    names: set[str] = set()
    page_token = ""
    while True:
        page = python.context.ListConversations(
            context_pb2.ListConversationsRequest(
                parent=workspace, page_size=100, page_token=page_token
            ),
            metadata=python.md,
            timeout=CALL_DEADLINE_S,
        )
        names.update(c.name for c in page.conversations)
        page_token = page.next_page_token
        if not page_token:
            return names


def placed(messages: list[context_pb2.Message]) -> list[tuple[str, list[str], int]]:
    """Each message's name, siblings and position among them: what a switcher shows."""
    return [(m.name, list(m.siblings), m.sibling_position) for m in messages]


def is_gone(python: Caller, message: str) -> bool:
    """Whether reading the message is NOT_FOUND."""
    try:
        python.context.GetMessage(
            context_pb2.GetMessageRequest(name=message),
            metadata=python.md,
            timeout=CALL_DEADLINE_S,
        )
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return True
        raise
    return False


def tombstones(python: Caller, conversation: str) -> list[tuple[str, int]]:
    """The (message, branch) of each MESSAGE_DELETED event the conversation's log holds,
    in log order."""
    return [
        (event.message_deleted.message, event.message_deleted.branch)
        for event in python.logged(conversation, "")
        if event.type == events_pb2.EVENT_TYPE_MESSAGE_DELETED
    ]

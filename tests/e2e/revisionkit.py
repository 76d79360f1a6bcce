"""An assistant with three revisions, made the way a person makes them through the
contracts (the Python stubs), for the clients' revision tests (Go, Node)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from google.protobuf import field_mask_pb2

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from tests.conftest import CALL_DEADLINE_S
from tests.e2e.restarts import Caller

ENGLISH: Final = "Answer in English."
FRENCH: Final = "Answer in French."
GERMAN: Final = "Answer in German."


@dataclass(frozen=True)
class Revised:
    """A workspace, a conversation in it, and its assistant ``helper`` at revisions 1-3:
    English instructions, then French, then German with a new display name."""

    workspace: str
    conversation: str
    created: dispatcher_pb2.Assistant
    second: dispatcher_pb2.Assistant
    third: dispatcher_pb2.Assistant

    @property
    def name(self) -> str:
        return self.created.name


def update_assistant(
    python: Caller, assistant: dispatcher_pb2.Assistant, *paths: str
) -> dispatcher_pb2.Assistant:
    return python.dispatcher.UpdateAssistant(
        dispatcher_pb2.UpdateAssistantRequest(
            assistant=assistant, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
        ),
        metadata=python.md,
        timeout=CALL_DEADLINE_S,
    ).assistant


def three_revisions(python: Caller, title: str) -> Revised:
    workspace = python.workspace(title)
    conversation = python.context.CreateConversation(
        context_pb2.CreateConversationRequest(
            parent=workspace, conversation=context_pb2.Conversation(title="Pinned")
        ),
        metadata=python.md,
        timeout=CALL_DEADLINE_S,
    ).conversation.name
    created = python.dispatcher.CreateAssistant(
        dispatcher_pb2.CreateAssistantRequest(
            parent=workspace,
            assistant_id="helper",
            assistant=dispatcher_pb2.Assistant(
                display_name="Helper", instructions=ENGLISH, handler="handlers/echo"
            ),
        ),
        metadata=python.md,
        timeout=CALL_DEADLINE_S,
    ).assistant
    second = update_assistant(
        python,
        dispatcher_pb2.Assistant(name=created.name, etag=created.etag, instructions=FRENCH),
        "instructions",
    )
    third = update_assistant(
        python,
        dispatcher_pb2.Assistant(
            name=created.name,
            etag=second.etag,
            display_name="Helper (German)",
            instructions=GERMAN,
        ),
        "display_name",
        "instructions",
    )
    return Revised(workspace, conversation, created, second, third)

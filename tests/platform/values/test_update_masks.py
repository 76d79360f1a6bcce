"""Each update's contract names exactly the fields its server lets the mask change.

A client reads what it may change from the comment on ``update_mask``; the server
decides from its own list (``platform/fieldmask.update_paths``). Issue 67's console
sent ``retry_safe`` in UpdateIntegration's mask, which the server accepted and the
comment did not name; UpdateAssistant's comment lacked ``voice`` and ``retrieval``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2
from switchboard.api.integration.v1 import integration_pb2
from switchboard.context.semantic.indexing import indexes
from switchboard.dispatcher.assistants import catalog as assistants
from switchboard.dispatcher.budgets import quotas
from switchboard.dispatcher.budgets.resources import catalog as budgets
from switchboard.dispatcher.schedules import catalog as schedules
from switchboard.integration import service as integrations

pytestmark = pytest.mark.unit

PROTO = Path(__file__).resolve().parents[3] / "proto"
#: Each update request, its contract file and what its server lets the mask change.
UPDATES: dict[str, tuple[Descriptor, str, Sequence[str]]] = {
    "UpdateIntegrationRequest": (
        integration_pb2.UpdateIntegrationRequest.DESCRIPTOR,
        "switchboard/api/integration/v1/integration.proto",
        integrations._MUTABLE,
    ),
    "UpdateAssistantRequest": (
        dispatcher_pb2.UpdateAssistantRequest.DESCRIPTOR,
        "switchboard/api/dispatcher/v1/dispatcher.proto",
        assistants.MUTABLE,
    ),
    "UpdateBudgetRequest": (
        dispatcher_pb2.UpdateBudgetRequest.DESCRIPTOR,
        "switchboard/api/dispatcher/v1/dispatcher.proto",
        budgets.MUTABLE,
    ),
    "UpdateWorkspaceQuotaRequest": (
        dispatcher_pb2.UpdateWorkspaceQuotaRequest.DESCRIPTOR,
        "switchboard/api/dispatcher/v1/dispatcher.proto",
        quotas.MUTABLE,
    ),
    "UpdateScheduleRequest": (
        dispatcher_pb2.UpdateScheduleRequest.DESCRIPTOR,
        "switchboard/api/dispatcher/v1/dispatcher.proto",
        schedules.MUTABLE,
    ),
    "UpdateSemanticIndexRequest": (
        context_pb2.UpdateSemanticIndexRequest.DESCRIPTOR,
        "switchboard/api/context/v1/context.proto",
        indexes.MUTABLE,
    ),
}


def mask_comment(path: str, message: str) -> str:
    """The comment above ``update_mask`` in ``message`` of the contract at ``path``."""
    text = (PROTO / path).read_text()
    body = re.search(rf"^message {message} \{{\n(.*?)^\}}", text, re.MULTILINE | re.DOTALL)
    assert body is not None, f"{message} not found in {path}"
    lines: list[str] = []
    for line in body[1].splitlines():
        stripped = line.strip()
        if stripped.startswith("//"):
            lines.append(stripped.removeprefix("//").strip())
        elif "update_mask" in stripped:
            return " ".join(lines)
        else:
            lines = []
    raise AssertionError(f"{message} has no update_mask")


@pytest.mark.parametrize("message", sorted(UPDATES))
def test_the_update_mask_comment_names_what_the_server_accepts(message: str) -> None:
    descriptor, path, mutable = UPDATES[message]
    # The resource is the request's first field; the comment may name other things
    # (`budget` in "unset in `budget`"), so only the resource's fields are read from it.
    resource = descriptor.fields[0].message_type
    assert resource is not None
    fields = {field.name for field in resource.fields}
    named = re.findall(r"`([a-z_]+)`", mask_comment(path, message))
    documented = [word for word in named if word in fields]
    assert sorted(documented) == sorted(mutable), (
        f"{message}.update_mask's comment names {sorted(documented)}, "
        f"the server accepts {sorted(mutable)}"
    )
    assert set(mutable) <= fields

"""Resource names (AIP-122) as typed values: the one way a name is read or written.

A name is parsed once, where it enters (a request field, an event, a stored
row), into a frozen value of its ids; code passes the value along and reads its
ids by name; ``str()`` writes it back, canonical::

    name = ConversationName.parse(request.parent, "parent")
    name.workspace, name.conversation      # "acme", "c1"
    name.parent                            # WorkspaceName("acme")
    str(name)                              # "workspaces/acme/conversations/c1"
    str(RunName(w, c, run_id))             # building one: never an f-string

- ``Kind.parse(text, field)`` is the request check: INVALID_ARGUMENT with a
  violation on ``field``, "is required" for an empty value and "must be a
  resource name of the form ``Kind.form``" for anything else that is not the
  whole of such a name (``Kind.refusal(text)`` is those words, for a caller that
  collects violations; the patterns are ``names.py``'s, matched with
  ``fullmatch``, so ``workspaces/acme\\n`` is not a name).
- ``Kind.parse_or_none(text)``: the name, or None, for a caller that words its
  own refusal (a filter, an optional field, one kind among several) or reads a
  name it wrote itself.
- ``Kind.replace_in(text, replace)``: each such name inside prose, rewritten
  (an error message shown to another protocol's client).
- ``owner(text, field)``: the workspace or user any name lives under (the
  policy's question), and ``parse_memory_scope`` for the three kinds of memory
  scope (a ``MemoryScope``).

A value says nothing about whether the resource exists, or who may see it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Final, Self, TypeAlias

from switchboard.platform.values import names
from switchboard.platform.values.names import ID


class ResourceName:
    """What every kind of name can do; each kind is a frozen dataclass of its ids,
    in the order the name spells them."""

    __slots__ = ()
    #: The whole name, one group per id (``names.py``'s, or this module's for the
    #: kinds only one service reads).
    pattern: ClassVar[re.Pattern[str]]
    #: The pattern as a person reads it, each id in braces (AIP-123's resource
    #: pattern): what a refusal says the name must look like.
    form: ClassVar[str]

    @classmethod
    def parse(cls, text: str, field: str) -> Self:
        """The name ``text`` is, or INVALID_ARGUMENT with a violation on ``field``."""
        return cls._from(names.match(cls.pattern, text, field, cls.form))

    @classmethod
    def refusal(cls, text: str) -> str:
        """What a field holding ``text``, which is no such name, is told."""
        return names.name_refusal(text, cls.form)

    @classmethod
    def parse_or_none(cls, text: str) -> Self | None:
        """The name ``text`` is, or None when it is not the whole of one."""
        found = cls.pattern.fullmatch(text)
        return None if found is None else cls._from(found)

    @classmethod
    def replace_in(cls, text: str, replace: Callable[[Self], str]) -> str:
        """``text`` with every such name in it (anywhere, not only whole) as
        ``replace`` writes it."""
        return cls.pattern.sub(lambda found: replace(cls._from(found)), text)

    @classmethod
    def _from(cls, found: re.Match[str]) -> Self:
        return cls(*found.groups())


# Under a workspace.


@dataclass(frozen=True, slots=True)
class WorkspaceName(ResourceName):
    """``workspaces/{workspace}``"""

    workspace: str
    pattern = names.WORKSPACE
    form = "workspaces/{workspace}"

    def __str__(self) -> str:
        return f"workspaces/{self.workspace}"


@dataclass(frozen=True, slots=True)
class ConversationName(ResourceName):
    """``workspaces/{workspace}/conversations/{conversation}``"""

    workspace: str
    conversation: str
    pattern = names.CONVERSATION
    form = "workspaces/{workspace}/conversations/{conversation}"

    def __str__(self) -> str:
        return f"workspaces/{self.workspace}/conversations/{self.conversation}"

    @property
    def parent(self) -> WorkspaceName:
        return WorkspaceName(self.workspace)


@dataclass(frozen=True, slots=True)
class MessageName(ResourceName):
    """``workspaces/{workspace}/conversations/{conversation}/messages/{message}``"""

    workspace: str
    conversation: str
    message: str
    pattern = names.MESSAGE
    form = "workspaces/{workspace}/conversations/{conversation}/messages/{message}"

    def __str__(self) -> str:
        return (
            f"workspaces/{self.workspace}/conversations/{self.conversation}/messages/{self.message}"
        )

    @property
    def parent(self) -> ConversationName:
        return ConversationName(self.workspace, self.conversation)


@dataclass(frozen=True, slots=True)
class RunName(ResourceName):
    """``workspaces/{workspace}/conversations/{conversation}/runs/{run}``"""

    workspace: str
    conversation: str
    run: str
    pattern = names.RUN
    form = "workspaces/{workspace}/conversations/{conversation}/runs/{run}"

    def __str__(self) -> str:
        return f"workspaces/{self.workspace}/conversations/{self.conversation}/runs/{self.run}"

    @property
    def parent(self) -> ConversationName:
        return ConversationName(self.workspace, self.conversation)


@dataclass(frozen=True, slots=True)
class VoiceSessionName(ResourceName):
    """``workspaces/{workspace}/conversations/{conversation}/voiceSessions/{session}``"""

    workspace: str
    conversation: str
    session: str
    pattern = names.VOICE_SESSION
    form = "workspaces/{workspace}/conversations/{conversation}/voiceSessions/{session}"

    def __str__(self) -> str:
        return (
            f"workspaces/{self.workspace}/conversations/{self.conversation}"
            f"/voiceSessions/{self.session}"
        )

    @property
    def parent(self) -> ConversationName:
        return ConversationName(self.workspace, self.conversation)


@dataclass(frozen=True, slots=True)
class MemberName(ResourceName):
    """``workspaces/{workspace}/members/{user}``: a user's membership of a workspace."""

    workspace: str
    user: str
    pattern = names.MEMBER
    form = "workspaces/{workspace}/members/{user}"

    def __str__(self) -> str:
        return f"workspaces/{self.workspace}/members/{self.user}"

    @property
    def parent(self) -> WorkspaceName:
        return WorkspaceName(self.workspace)


@dataclass(frozen=True, slots=True)
class AssistantName(ResourceName):
    """``workspaces/{workspace}/assistants/{assistant}``"""

    workspace: str
    assistant: str
    pattern = names.ASSISTANT
    form = "workspaces/{workspace}/assistants/{assistant}"

    def __str__(self) -> str:
        return f"workspaces/{self.workspace}/assistants/{self.assistant}"

    @property
    def parent(self) -> WorkspaceName:
        return WorkspaceName(self.workspace)

    def revision(self, number: int) -> str:
        """Its revision ``number``'s name (AssistantRevision.name)."""
        return f"{self}/revisions/{number}"


@dataclass(frozen=True, slots=True)
class IntegrationName(ResourceName):
    """``workspaces/{workspace}/integrations/{integration}``"""

    workspace: str
    integration: str
    pattern = names.INTEGRATION
    form = "workspaces/{workspace}/integrations/{integration}"

    def __str__(self) -> str:
        return f"workspaces/{self.workspace}/integrations/{self.integration}"

    @property
    def parent(self) -> WorkspaceName:
        return WorkspaceName(self.workspace)


@dataclass(frozen=True, slots=True)
class ToolName(ResourceName):
    """``workspaces/{workspace}/integrations/{integration}/tools/{segment}``: the
    segment is the tool's name escaped (``names.tool_segment``); ``tool`` reads it back."""

    workspace: str
    integration: str
    segment: str
    pattern = names.TOOL
    form = "workspaces/{workspace}/integrations/{integration}/tools/{tool}"

    def __str__(self) -> str:
        return f"workspaces/{self.workspace}/integrations/{self.integration}/tools/{self.segment}"

    @property
    def parent(self) -> IntegrationName:
        return IntegrationName(self.workspace, self.integration)

    @property
    def tool(self) -> str | None:
        """The tool's own name; None for a segment no name escapes to (``~41`` for ``A``)."""
        return names.tool_from_segment(self.segment)

    @classmethod
    def of_tool(cls, integration: IntegrationName, tool: str) -> ToolName | None:
        """The name of the tool ``integration`` calls ``tool``; None when it has none
        (``names.tool_segment``)."""
        segment = names.tool_segment(tool)
        if segment is None:
            return None
        return cls(integration.workspace, integration.integration, segment)


@dataclass(frozen=True, slots=True)
class DeliveryName(ResourceName):
    """``workspaces/{workspace}/integrations/{integration}/deliveries/{delivery}``: one
    event's delivery to a webhook."""

    workspace: str
    integration: str
    delivery: str
    pattern = re.compile(rf"workspaces/({ID})/integrations/({ID})/deliveries/({ID})")
    form = "workspaces/{workspace}/integrations/{integration}/deliveries/{delivery}"

    def __str__(self) -> str:
        return (
            f"workspaces/{self.workspace}/integrations/{self.integration}"
            f"/deliveries/{self.delivery}"
        )

    @property
    def parent(self) -> IntegrationName:
        return IntegrationName(self.workspace, self.integration)


@dataclass(frozen=True, slots=True)
class PushConfigName(ResourceName):
    """``workspaces/{workspace}/pushConfigs/{config}``: an A2A task's push endpoint,
    as webhook deliveries name it."""

    workspace: str
    config: str
    pattern = re.compile(rf"workspaces/({ID})/pushConfigs/({ID})")
    form = "workspaces/{workspace}/pushConfigs/{config}"

    def __str__(self) -> str:
        return f"workspaces/{self.workspace}/pushConfigs/{self.config}"

    @property
    def parent(self) -> WorkspaceName:
        return WorkspaceName(self.workspace)


@dataclass(frozen=True, slots=True)
class BudgetName(ResourceName):
    """``workspaces/{workspace}/budgets/{budget}``"""

    workspace: str
    budget: str
    pattern = names.BUDGET
    form = "workspaces/{workspace}/budgets/{budget}"

    def __str__(self) -> str:
        return f"workspaces/{self.workspace}/budgets/{self.budget}"

    @property
    def parent(self) -> WorkspaceName:
        return WorkspaceName(self.workspace)


@dataclass(frozen=True, slots=True)
class ScheduleName(ResourceName):
    """``workspaces/{workspace}/schedules/{schedule}``"""

    workspace: str
    schedule: str
    pattern = re.compile(rf"workspaces/({ID})/schedules/({ID})")
    form = "workspaces/{workspace}/schedules/{schedule}"

    def __str__(self) -> str:
        return f"workspaces/{self.workspace}/schedules/{self.schedule}"

    @property
    def parent(self) -> WorkspaceName:
        return WorkspaceName(self.workspace)


@dataclass(frozen=True, slots=True)
class CallName(ResourceName):
    """``workspaces/{workspace}/calls/{call}``"""

    workspace: str
    call: str
    pattern = re.compile(rf"workspaces/({ID})/calls/({ID})")
    form = "workspaces/{workspace}/calls/{call}"

    def __str__(self) -> str:
        return f"workspaces/{self.workspace}/calls/{self.call}"

    @property
    def parent(self) -> WorkspaceName:
        return WorkspaceName(self.workspace)


@dataclass(frozen=True, slots=True)
class FileName(ResourceName):
    """``workspaces/{workspace}/files/{file}``"""

    workspace: str
    file: str
    pattern = names.FILE
    form = "workspaces/{workspace}/files/{file}"

    def __str__(self) -> str:
        return f"workspaces/{self.workspace}/files/{self.file}"

    @property
    def parent(self) -> WorkspaceName:
        return WorkspaceName(self.workspace)


@dataclass(frozen=True, slots=True)
class UploadName(ResourceName):
    """``workspaces/{workspace}/uploads/{upload}``: a file being uploaded in parts."""

    workspace: str
    upload: str
    pattern = names.UPLOAD
    form = "workspaces/{workspace}/uploads/{upload}"

    def __str__(self) -> str:
        return f"workspaces/{self.workspace}/uploads/{self.upload}"

    @property
    def parent(self) -> WorkspaceName:
        return WorkspaceName(self.workspace)


@dataclass(frozen=True, slots=True)
class QuotaName(ResourceName):
    """``workspaces/{workspace}/quota``: the workspace's quotas, a singleton (AIP-156)."""

    workspace: str
    pattern = names.WORKSPACE_QUOTA
    form = "workspaces/{workspace}/quota"

    def __str__(self) -> str:
        return f"workspaces/{self.workspace}/quota"

    @property
    def parent(self) -> WorkspaceName:
        return WorkspaceName(self.workspace)


@dataclass(frozen=True, slots=True)
class SemanticIndexName(ResourceName):
    """``workspaces/{workspace}/semanticIndex``: the workspace's index settings, a singleton."""

    workspace: str
    pattern = names.SEMANTIC_INDEX
    form = "workspaces/{workspace}/semanticIndex"

    def __str__(self) -> str:
        return f"workspaces/{self.workspace}/semanticIndex"

    @property
    def parent(self) -> WorkspaceName:
        return WorkspaceName(self.workspace)


# Under a user.


@dataclass(frozen=True, slots=True)
class UserName(ResourceName):
    """``users/{user}``"""

    user: str
    pattern = names.USER
    form = "users/{user}"

    def __str__(self) -> str:
        return f"users/{self.user}"


@dataclass(frozen=True, slots=True)
class SessionName(ResourceName):
    """``users/{user}/sessions/{session}``: a signed-in session."""

    user: str
    session: str
    pattern = names.SESSION
    form = "users/{user}/sessions/{session}"

    def __str__(self) -> str:
        return f"users/{self.user}/sessions/{self.session}"

    @property
    def parent(self) -> UserName:
        return UserName(self.user)


@dataclass(frozen=True, slots=True)
class DataExportName(ResourceName):
    """``users/{user}/exports/{export}``: an archive of a person's data (ExportMyData)."""

    user: str
    export: str
    pattern = names.DATA_EXPORT
    form = "users/{user}/exports/{export}"

    def __str__(self) -> str:
        return f"users/{self.user}/exports/{self.export}"

    @property
    def parent(self) -> UserName:
        return UserName(self.user)


@dataclass(frozen=True, slots=True)
class ApiKeyName(ResourceName):
    """``users/{user}/apiKeys/{key}``"""

    user: str
    key: str
    pattern = names.API_KEY
    form = "users/{user}/apiKeys/{key}"

    def __str__(self) -> str:
        return f"users/{self.user}/apiKeys/{self.key}"

    @property
    def parent(self) -> UserName:
        return UserName(self.user)


# Of the deployment.


@dataclass(frozen=True, slots=True)
class HandlerName(ResourceName):
    """``handlers/{handler}``: a handler the dispatcher runs (``echo``, ``llm``, an expert's)."""

    handler: str
    pattern = re.compile(rf"handlers/({ID})")
    form = "handlers/{handler}"

    def __str__(self) -> str:
        return f"handlers/{self.handler}"


# Memory, whose scope is one of three kinds.

#: Where memory lives: a user, a workspace or a conversation.
MemoryScope: TypeAlias = UserName | WorkspaceName | ConversationName
_MEMORY_SCOPES: Final = (UserName, WorkspaceName, ConversationName)
MEMORY_SCOPE_FORM: Final = " or ".join(scope.form for scope in _MEMORY_SCOPES)


def memory_scope_or_none(text: str) -> MemoryScope | None:
    """The memory scope ``text`` is (as ``names.MEMORY_SCOPE`` matches it), or None."""
    for kind in _MEMORY_SCOPES:
        if (scope := kind.parse_or_none(text)) is not None:
            return scope
    return None


def parse_memory_scope(text: str, field: str) -> MemoryScope:
    """The memory scope ``text`` is, or INVALID_ARGUMENT with a violation on ``field``."""
    scope = memory_scope_or_none(text)
    if scope is None:
        raise names.invalid_name(text, field, MEMORY_SCOPE_FORM)
    return scope


@dataclass(frozen=True, slots=True)
class MemoryName(ResourceName):
    """``{scope}/memories/{memory}``: a memory item in its scope."""

    scope: MemoryScope
    memory: str
    pattern = names.MEMORY_ITEM
    form = " or ".join(f"{scope.form}/memories/{{memory}}" for scope in _MEMORY_SCOPES)

    def __str__(self) -> str:
        return f"{self.scope}/memories/{self.memory}"

    @property
    def parent(self) -> MemoryScope:
        return self.scope

    @classmethod
    def _from(cls, found: re.Match[str]) -> Self:
        scope, memory = found.groups()
        return cls(parse_memory_scope(scope, "name"), memory)  # the pattern held a scope


# The owner of any name.


#: Any name ``owner`` reads: a workspace's or a user's, or one under either.
OWNED_FORM: Final = "workspaces/{workspace}[/...] or users/{user}[/...]"


def owner_or_none(text: str) -> WorkspaceName | UserName | None:
    """The workspace or user any name ``text`` lives under (itself, for
    ``workspaces/{w}`` and ``users/{u}``); None when it is no name under either."""
    if found := names.UNDER_WORKSPACE.fullmatch(text):
        return WorkspaceName._from(found)
    if found := names.UNDER_USER.fullmatch(text):
        return UserName._from(found)
    return None


def owner(text: str, field: str) -> WorkspaceName | UserName:
    """As ``owner_or_none``, with INVALID_ARGUMENT naming ``field`` for no such name,
    and the form the name was most likely meant to have (``meant_form``)."""
    found = owner_or_none(text)
    if found is None:
        raise names.invalid_name(text, field, meant_form(text, field))
    return found


#: Every kind under a workspace or a user, for ``meant_form``.
_KINDS: Final[tuple[type[ResourceName], ...]] = (
    WorkspaceName,
    ConversationName,
    MessageName,
    RunName,
    VoiceSessionName,
    MemberName,
    AssistantName,
    IntegrationName,
    ToolName,
    DeliveryName,
    PushConfigName,
    BudgetName,
    ScheduleName,
    CallName,
    FileName,
    UploadName,
    UserName,
    SessionName,
    ApiKeyName,
)
#: A field named for one kind of resource (the last segment of its path).
_FIELD_KINDS: Final[dict[str, type[ResourceName]]] = {
    "run": RunName,
    "conversation": ConversationName,
    "workspace": WorkspaceName,
    "assistant": AssistantName,
    "integration": IntegrationName,
    "budget": BudgetName,
    "schedule": ScheduleName,
    "call": CallName,
    "file": FileName,
    "user": UserName,
}


def _collections(form_or_name: str) -> list[str]:
    """The collection words of a form or a name: every other segment from the first."""
    return form_or_name.split("/")[0::2]


def meant_form(text: str, field: str) -> str:
    """The form a name that is none was most likely meant to have, for its refusal: the
    kind its field is named for, else the kind whose collections start the most of
    the text's ("workspaces/w/conversations/c/runs/r/x" meant a run's), else any
    workspace's or user's name. A refusal that says which name is wanted, not only
    that this is none."""
    kind = _FIELD_KINDS.get(field.rsplit(".", 1)[-1].split("[", 1)[0])
    if kind is not None:
        return kind.form
    words = _collections(text)
    best: tuple[int, str] = (0, OWNED_FORM)
    for candidate in _KINDS:
        expected = _collections(candidate.form)
        if len(expected) > best[0] and words[: len(expected)] == expected:
            best = (len(expected), candidate.form)
    return best[1]

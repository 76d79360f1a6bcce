"""Resource names as typed values: each kind reads its own names whole and writes them back."""

from __future__ import annotations

import inspect
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from switchboard.platform.errors import InvalidArgument
from switchboard.platform.values import names, resources
from switchboard.platform.values.resources import (
    ApiKeyName,
    AssistantName,
    BudgetName,
    CallName,
    ConversationName,
    DataExportName,
    DeliveryName,
    FileName,
    HandlerName,
    IntegrationName,
    MemberName,
    MemoryName,
    MessageName,
    PushConfigName,
    QuotaName,
    ResourceName,
    RunName,
    ScheduleName,
    SemanticIndexName,
    SessionName,
    ToolName,
    UploadName,
    UserName,
    VoiceSessionName,
    WorkspaceName,
)

pytestmark = pytest.mark.unit

#: One name of each kind, its value, and its parent (None for a kind without one).
SAMPLES: list[tuple[str, ResourceName, ResourceName | None]] = [
    ("workspaces/acme", WorkspaceName("acme"), None),
    (
        "workspaces/acme/conversations/c1",
        ConversationName("acme", "c1"),
        WorkspaceName("acme"),
    ),
    (
        "workspaces/acme/conversations/c1/messages/m-1",
        MessageName("acme", "c1", "m-1"),
        ConversationName("acme", "c1"),
    ),
    (
        "workspaces/acme/conversations/c1/runs/r1",
        RunName("acme", "c1", "r1"),
        ConversationName("acme", "c1"),
    ),
    (
        "workspaces/acme/conversations/c1/voiceSessions/s-1",
        VoiceSessionName("acme", "c1", "s-1"),
        ConversationName("acme", "c1"),
    ),
    ("workspaces/acme/members/u1", MemberName("acme", "u1"), WorkspaceName("acme")),
    ("workspaces/acme/assistants/calc", AssistantName("acme", "calc"), WorkspaceName("acme")),
    (
        "workspaces/acme/integrations/mcp-1",
        IntegrationName("acme", "mcp-1"),
        WorkspaceName("acme"),
    ),
    (
        "workspaces/acme/integrations/mcp-1/tools/with~20space.Echo",
        ToolName("acme", "mcp-1", "with~20space.Echo"),
        IntegrationName("acme", "mcp-1"),
    ),
    (
        "workspaces/acme/integrations/hook/deliveries/d1",
        DeliveryName("acme", "hook", "d1"),
        IntegrationName("acme", "hook"),
    ),
    ("workspaces/acme/pushConfigs/p1", PushConfigName("acme", "p1"), WorkspaceName("acme")),
    ("workspaces/acme/budgets/daily", BudgetName("acme", "daily"), WorkspaceName("acme")),
    ("workspaces/acme/schedules/nightly", ScheduleName("acme", "nightly"), WorkspaceName("acme")),
    ("workspaces/acme/calls/c1", CallName("acme", "c1"), WorkspaceName("acme")),
    ("workspaces/acme/files/report", FileName("acme", "report"), WorkspaceName("acme")),
    ("workspaces/acme/uploads/u-1", UploadName("acme", "u-1"), WorkspaceName("acme")),
    ("workspaces/acme/quota", QuotaName("acme"), WorkspaceName("acme")),
    ("workspaces/acme/semanticIndex", SemanticIndexName("acme"), WorkspaceName("acme")),
    ("users/u1", UserName("u1"), None),
    ("users/u1/sessions/s1", SessionName("u1", "s1"), UserName("u1")),
    ("users/u1/exports/e1", DataExportName("u1", "e1"), UserName("u1")),
    ("users/u1/apiKeys/k1", ApiKeyName("u1", "k1"), UserName("u1")),
    ("handlers/echo", HandlerName("echo"), None),
    ("users/u1/memories/m1", MemoryName(UserName("u1"), "m1"), UserName("u1")),
    ("workspaces/acme/memories/m1", MemoryName(WorkspaceName("acme"), "m1"), WorkspaceName("acme")),
    (
        "workspaces/acme/conversations/c1/memories/m1",
        MemoryName(ConversationName("acme", "c1"), "m1"),
        ConversationName("acme", "c1"),
    ),
]
KINDS = sorted(
    {type(value) for _, value, _ in SAMPLES},
    key=lambda kind: kind.__name__,
)
#: Text that is no name of any kind: a sample changed at one place.
BROKEN = [
    "\n",
    "\r\n",
    " ",
    "/",
    "\x00",
    "\u2028",
]
ID_STRATEGY = st.from_regex(names.ID, fullmatch=True)


def test_every_kind_in_the_module_has_a_sample() -> None:
    declared = {
        kind
        for kind in vars(resources).values()
        if inspect.isclass(kind) and issubclass(kind, ResourceName) and kind is not ResourceName
    }
    assert declared == set(KINDS)


@pytest.mark.parametrize(("text", "value", "parent"), SAMPLES, ids=[t for t, _, _ in SAMPLES])
def test_a_name_parses_to_its_value_and_writes_back(
    text: str, value: ResourceName, parent: ResourceName | None
) -> None:
    kind = type(value)
    assert kind.parse(text, "name") == value
    assert kind.parse_or_none(text) == value
    assert str(value) == text
    assert getattr(value, "parent", None) == parent
    assert hash(kind.parse(text, "name")) == hash(value)


@pytest.mark.parametrize(("text", "value"), [(t, v) for t, v, _ in SAMPLES], ids=str)
@pytest.mark.parametrize("extra", BROKEN, ids=repr)
def test_a_name_with_anything_around_it_is_refused_naming_the_field(
    text: str, value: ResourceName, extra: str
) -> None:
    kind = type(value)
    for broken in (text + extra, extra + text):
        assert kind.parse_or_none(broken) is None
        with pytest.raises(InvalidArgument) as caught:
            kind.parse(broken, "request.parent")
        expected = f"must be a resource name of the form {kind.form} ({names.ID_WORDS})"
        assert str(caught.value) == f"request.parent {expected}"
        assert [(v.field, v.description) for v in caught.value.violations] == [
            ("request.parent", expected)
        ]
        assert kind.refusal(broken) == expected


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.__name__)
def test_an_empty_name_is_required(kind: type[ResourceName]) -> None:
    assert kind.parse_or_none("") is None
    with pytest.raises(InvalidArgument) as caught:
        kind.parse("", "parent")
    assert str(caught.value) == "parent is required"
    assert [(v.field, v.description) for v in caught.value.violations] == [
        ("parent", "is required")
    ]


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        (WorkspaceName, "workspaces/"),
        (WorkspaceName, "workspaces/Acme"),  # upper case
        (WorkspaceName, "workspaces/-acme"),  # starts with a dash
        (WorkspaceName, "workspaces/ac.me"),
        (WorkspaceName, "workspaces/" + "a" * 64),  # one past the longest id
        (WorkspaceName, "workspace/acme"),
        (WorkspaceName, "workspaces/acme/conversations/c1"),  # a child is not its parent
        (ConversationName, "workspaces/acme/conversations"),
        (ConversationName, "workspaces/acme/conversation/c1"),
        (ConversationName, "workspaces/acme/conversations/c1/"),
        (ConversationName, "workspaces//conversations/c1"),
        (ConversationName, "workspaces/acme/runs/c1"),
        (MessageName, "workspaces/acme/conversations/c1/runs/m1"),
        (RunName, "workspaces/acme/conversations/c1/messages/r1"),
        (RunName, "workspaces/acme/runs/r1"),
        (VoiceSessionName, "workspaces/acme/conversations/c1/voicesessions/s1"),
        (MemberName, "workspaces/acme/users/u1"),
        (AssistantName, "workspaces/acme/assistants/Calc"),
        (IntegrationName, "workspaces/acme/integrations/mcp_1"),
        (ToolName, "workspaces/acme/integrations/mcp-1/tools/"),
        (ToolName, "workspaces/acme/integrations/mcp-1/tools/a b"),  # unescaped
        (ToolName, "workspaces/acme/integrations/mcp-1/tools/~2"),
        (ToolName, "workspaces/acme/integrations/mcp-1/tools/" + "a" * 129),
        (DeliveryName, "workspaces/acme/integrations/hook/delivery/d1"),
        (PushConfigName, "workspaces/acme/pushconfigs/p1"),
        (BudgetName, "workspaces/acme/budget/daily"),
        (ScheduleName, "workspaces/acme/schedules/Nightly"),
        (CallName, "workspaces/acme/call/c1"),
        (FileName, "workspaces/acme/files"),
        (UploadName, "workspaces/acme/files/u1"),
        (QuotaName, "workspaces/acme/quota/q1"),
        (QuotaName, "workspaces/acme/quotas"),
        (SemanticIndexName, "workspaces/acme/semanticindex"),
        (UserName, "users/U1"),
        (UserName, "user/u1"),
        (SessionName, "users/u1/session/s1"),
        (DataExportName, "users/u1/export/e1"),
        (ApiKeyName, "users/u1/apikeys/k1"),
        (HandlerName, "handlers/"),
        (HandlerName, "handlers/Echo"),
        (MemoryName, "workspaces/acme/members/u1/memories/m1"),  # not a memory scope
        (MemoryName, "users/u1/memories/"),
        (MemoryName, "memories/m1"),
    ],
    ids=lambda value: value if isinstance(value, str) else value.__name__,
)
def test_a_malformed_name_is_refused_naming_the_field(kind: type[ResourceName], text: str) -> None:
    assert kind.parse_or_none(text) is None
    with pytest.raises(InvalidArgument) as caught:
        kind.parse(text, "conversation")
    assert str(caught.value) == f"conversation {kind.refusal(text)}"
    assert kind.form in str(caught.value)
    assert [v.field for v in caught.value.violations] == ["conversation"]


def test_a_refusal_says_the_form_the_name_must_have() -> None:
    with pytest.raises(InvalidArgument) as caught:
        ConversationName.parse("trip", "name")
    assert str(caught.value) == (
        "name must be a resource name of the form "
        "workspaces/{workspace}/conversations/{conversation} "
        "(ids: lowercase letters, digits and hyphens)"
    )
    assert [(v.field, v.description) for v in caught.value.violations] == [
        ("name", str(caught.value).removeprefix("name "))
    ]


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.__name__)
def test_each_kind_s_form_is_its_pattern_in_words(kind: type[ResourceName]) -> None:
    """Every form a refusal names, its braces filled with ids, is a name of that kind
    (each alternative, for memory), with as many ids as the pattern has."""
    for alternative in kind.form.split(" or "):
        filled = re.sub(r"\{\w+\}", "a1", alternative)
        assert kind.parse_or_none(filled) is not None, (kind.__name__, alternative)
    if kind is not MemoryName:
        assert len(re.findall(r"\{\w+\}", kind.form)) == kind.pattern.groups


@pytest.mark.parametrize(("text", "value"), [(t, v) for t, v, _ in SAMPLES], ids=str)
def test_each_kind_takes_only_its_own_names(text: str, value: ResourceName) -> None:
    for kind in KINDS:
        if kind is not type(value):
            assert kind.parse_or_none(text) is None, kind.__name__


def test_the_longest_id_is_sixty_three_characters() -> None:
    longest = "a" * 63
    assert str(WorkspaceName.parse(f"workspaces/{longest}", "name")) == f"workspaces/{longest}"
    assert RunName.parse(f"workspaces/a/conversations/{longest}/runs/r", "name").conversation == (
        longest
    )


@given(workspace=ID_STRATEGY, conversation=ID_STRATEGY, run=ID_STRATEGY)
def test_any_ids_write_a_name_that_reads_back(workspace: str, conversation: str, run: str) -> None:
    for value in (
        WorkspaceName(workspace),
        ConversationName(workspace, conversation),
        RunName(workspace, conversation, run),
        MessageName(workspace, conversation, run),
        FileName(workspace, run),
        ScheduleName(workspace, run),
        CallName(workspace, run),
        DeliveryName(workspace, conversation, run),
        ApiKeyName(workspace, run),
        MemoryName(ConversationName(workspace, conversation), run),
        MemoryName(UserName(workspace), run),
    ):
        assert type(value).parse(str(value), "name") == value


@given(tool=st.text(min_size=1, max_size=40))
def test_a_tool_name_writes_the_segment_that_reads_back_its_name(tool: str) -> None:
    integration = IntegrationName("acme", "mcp-1")
    name = ToolName.of_tool(integration, tool)
    if names.tool_segment(tool) is None:  # a lone surrogate, or over 128 UTF-8 bytes
        assert name is None
        return
    assert name is not None
    assert name.parent == integration
    assert name.tool == tool
    assert ToolName.parse(str(name), "name") == name


def test_a_segment_no_tool_name_escapes_to_reads_as_no_tool() -> None:
    # ``~41`` is ``A`` escaped, which a name writes as itself.
    name = ToolName.parse("workspaces/acme/integrations/mcp-1/tools/~41", "name")
    assert name.segment == "~41"
    assert name.tool is None


@pytest.mark.parametrize(
    ("text", "scope"),
    [
        ("users/u1", UserName("u1")),
        ("workspaces/acme", WorkspaceName("acme")),
        ("workspaces/acme/conversations/c1", ConversationName("acme", "c1")),
    ],
)
def test_a_memory_scope_is_a_user_a_workspace_or_a_conversation(
    text: str, scope: resources.MemoryScope
) -> None:
    assert resources.parse_memory_scope(text, "parent") == scope
    assert resources.memory_scope_or_none(text) == scope


@pytest.mark.parametrize(
    "text",
    ["", "workspaces/acme/members/u1", "users/u1/sessions/s1", "workspaces/acme\n", "users"],
)
def test_anything_else_is_no_memory_scope(text: str) -> None:
    assert resources.memory_scope_or_none(text) is None
    with pytest.raises(InvalidArgument) as caught:
        resources.parse_memory_scope(text, "parent")
    description = (
        "is required"
        if not text
        else "must be a resource name of the form users/{user} or workspaces/{workspace} or "
        "workspaces/{workspace}/conversations/{conversation} "
        "(ids: lowercase letters, digits and hyphens)"
    )
    assert str(caught.value) == f"parent {description}"
    assert [(v.field, v.description) for v in caught.value.violations] == [("parent", description)]


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("workspaces/acme", WorkspaceName("acme")),
        ("workspaces/acme/conversations/c1/runs/r1", WorkspaceName("acme")),
        ("workspaces/acme/integrations/mcp-1/tools/with~20space", WorkspaceName("acme")),
        ("workspaces/acme/quota", WorkspaceName("acme")),
        ("workspaces/acme/semanticIndex", WorkspaceName("acme")),
        ("users/u1", UserName("u1")),
        ("users/u1/apiKeys/k1", UserName("u1")),
    ],
)
def test_the_owner_of_a_name_is_its_workspace_or_user(
    text: str, found: WorkspaceName | UserName
) -> None:
    assert resources.owner(text, "name") == found
    assert resources.owner_or_none(text) == found


@pytest.mark.parametrize(
    ("text", "form"),
    [
        ("", ""),
        ("workspaces/acme\n", resources.WorkspaceName.form),
        ("users/u1/apiKeys/k1\n", resources.ApiKeyName.form),
        ("handlers/echo", resources.OWNED_FORM),
        ("workspaces/acme/x", resources.WorkspaceName.form),
    ],
)
def test_a_name_under_no_workspace_or_user_has_no_owner(text: str, form: str) -> None:
    assert resources.owner_or_none(text) is None
    with pytest.raises(InvalidArgument) as caught:
        resources.owner(text, "parent")
    assert [v.field for v in caught.value.violations] == ["parent"]
    if text:
        # The form it was most likely meant to have (``meant_form``).
        assert f"of the form {form} " in str(caught.value)


def test_names_inside_text_are_replaced_by_what_their_values_say() -> None:
    text = "workspaces/acme/conversations/c1/runs/r1 waits on workspaces/acme/budgets/daily"
    assert RunName.replace_in(text, lambda run: f"task {run.conversation}.{run.run}") == (
        "task c1.r1 waits on workspaces/acme/budgets/daily"
    )
    assert BudgetName.replace_in(text, lambda budget: budget.budget).endswith(" waits on daily")


def test_a_value_is_frozen() -> None:
    name = ConversationName("acme", "c1")
    with pytest.raises(AttributeError):
        name.workspace = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "field", "form"),
    [
        # The field says which kind it wants.
        ("workspaces/w/runs/y/z", "run", resources.RunName.form),
        ("nonsense", "request.conversation", resources.ConversationName.form),
        # Else the kind whose collections start the most of the text's.
        ("workspaces/w/conversations/c/runs/r/more", "name", resources.RunName.form),
        ("workspaces/w/budgets/B@d", "name", resources.BudgetName.form),
        ("users/u/apiKeys/k/x", "name", resources.ApiKeyName.form),
        # Else any workspace's or user's name.
        ("nonsense", "name", resources.OWNED_FORM),
    ],
)
def test_a_name_that_owns_nothing_is_told_the_form_it_was_meant_to_have(
    text: str, field: str, form: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        resources.owner(text, field)
    (violation,) = caught.value.violations
    assert violation.field == field
    assert f"of the form {form}" in violation.description

"""What an assistant may hold: the checks CreateAssistant and UpdateAssistant make.

Each field a request sets is checked against the contract's ranges and the
server's limits (``AssistantLimits``), and every bad field is named in one
INVALID_ARGUMENT. The cheap checks come first: a request they refuse costs no
lookups. Then what the assistant names is looked up: its handler, its tools'
integrations, the assistants it delegates or hands over to (read fresh, not
from another process's cache), the handlers it delegates to, and its delegates'
input schemas, compiled off the loop.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Final

from switchboard.api.context.v1 import context_pb2
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2
from switchboard.platform.errors import InvalidArgument, Violations
from switchboard.platform.schemas import compile_schema
from switchboard.platform.values import memorypolicy, names, structs
from switchboard.platform.values.resources import (
    AssistantName,
    HandlerName,
    IntegrationName,
    WorkspaceName,
)

MAX_DISPLAY_NAME: Final = 200
MAX_DESCRIPTION: Final = 2_000
MAX_INSTRUCTIONS: Final = 32_000
MAX_MODEL_NAME: Final = 200
MAX_TOOL_ENTRIES: Final = 32
MAX_TOOLS_PER_ENTRY: Final = 128
MIN_CONTEXT_BUDGET: Final = 100
MAX_CONTEXT_BUDGET: Final = 1_000_000
MAX_TEMPERATURE: Final = 2.0
#: ``VoiceSettings``: a model's name, a voice's name, and a language (ISO-639-1).
MAX_VOICE_MODEL: Final = 256
MAX_VOICE_NAME: Final = 64
_LANGUAGE: Final = re.compile(r"[a-z]{2}")
#: ``RetrievalSettings``: the contract's ranges (0 means the default).
MAX_RETRIEVAL_TOP_K: Final = 20
MAX_RETRIEVAL_TOKENS: Final = 32_000
MAX_RETRIEVAL_FILTER: Final = 1_000
#: ``Assistant.delegates`` and ``handoffs``: how many of each, and each one's description.
MAX_DELEGATES: Final = 16
MAX_DELEGATE_DESCRIPTION: Final = 1_000
#: The largest input schema a delegate may give (its serialized size).
MAX_INPUT_SCHEMA_BYTES: Final = 16 * 1024
_HISTORIES: Final = frozenset(pb.HandoffHistory.values())
_MODES: Final = frozenset(context_pb2.SearchMode.values())
#: Parses a retrieval filter as the context service will (``(text, workspace_id)``),
#: raising InvalidArgument on ``assistant.retrieval.filter``; given by the
#: composition, since the dispatcher does not import the context service.
FilterCheck = Callable[[str, str], object]


@dataclass(frozen=True)
class AssistantLimits:
    max_per_workspace: int
    #: Names of the configured LLM providers (``ModelSettings.provider`` must be one).
    providers: tuple[str, ...]
    #: The ceiling of ``ModelSettings.max_output_tokens``.
    max_output_tokens: int
    #: The ceiling of ``max_tool_steps``.
    max_tool_steps: int
    #: The ceiling of ``memory_policy.max_items`` (the context service's items per scope).
    max_memory_items: int = memorypolicy.DEFAULT_MAX_ITEMS * 50


def _voice(voice: pb.VoiceSettings, violations: Violations) -> None:
    """Speech settings: names within their lengths, a language of two lowercase letters."""
    for field in ("transcription_model", "speech_model"):
        if len(getattr(voice, field)) > MAX_VOICE_MODEL:
            violations.add(
                f"assistant.voice.{field}", f"is longer than {MAX_VOICE_MODEL} characters"
            )
    if len(voice.voice) > MAX_VOICE_NAME:
        violations.add("assistant.voice.voice", f"is longer than {MAX_VOICE_NAME} characters")
    if voice.language and not _LANGUAGE.fullmatch(voice.language):
        violations.add(
            "assistant.voice.language",
            "must be an ISO-639-1 code (two lowercase letters, for example en), or empty",
        )
    if voice.turn_detector not in pb.TurnDetector.values():
        violations.add("assistant.voice.turn_detector", "is not a known detector")
    if voice.turn_eagerness not in pb.TurnEagerness.values():
        violations.add("assistant.voice.turn_eagerness", "is not a known eagerness")


def _retrieval(
    retrieval: pb.RetrievalSettings,
    workspace_id: str,
    check_filter: FilterCheck | None,
    violations: Violations,
) -> None:
    """Retrieval settings: counts in the contract's ranges, a known mode, a filter
    that parses (when the composition gave the parser)."""
    if not 0 <= retrieval.top_k <= MAX_RETRIEVAL_TOP_K:
        violations.add("assistant.retrieval.top_k", f"must be 0 (5) or 1 to {MAX_RETRIEVAL_TOP_K}")
    if not 0 <= retrieval.token_budget <= MAX_RETRIEVAL_TOKENS:
        violations.add(
            "assistant.retrieval.token_budget",
            f"must be 0 (1,000) or 1 to {MAX_RETRIEVAL_TOKENS:,}",
        )
    if retrieval.mode not in _MODES:
        violations.add(
            "assistant.retrieval.mode",
            "must be a SearchMode (FULL_TEXT, SEMANTIC, HYBRID) or unset",
        )
    if len(retrieval.filter) > MAX_RETRIEVAL_FILTER:
        violations.add(
            "assistant.retrieval.filter", f"is longer than {MAX_RETRIEVAL_FILTER:,} characters"
        )
    elif retrieval.filter and check_filter is not None:
        try:
            check_filter(retrieval.filter, workspace_id)
        except InvalidArgument as refused:
            violations.items.extend(refused.violations)


def _others(
    workspace_id: str,
    own_id: str,
    entries: Sequence[pb.AssistantDelegate | pb.AssistantHandoff],
    kind: str,
    violations: Violations,
    handlers: dict[str, str] | None = None,
) -> dict[str, str]:
    """The assistants ``entries`` (``delegates`` or ``handoffs``) name, by the field
    naming each (their existence is checked after the cheap checks); the handlers a
    delegate names instead go into ``handlers`` likewise; violations for the rest."""
    if len(entries) > MAX_DELEGATES:
        violations.add(f"assistant.{kind}", f"at most {MAX_DELEGATES} {kind}")
        return {}
    found: dict[str, str] = {}
    for index, entry in enumerate(entries):
        field = f"assistant.{kind}[{index}].assistant"
        if isinstance(entry, pb.AssistantDelegate) and entry.handler:
            _handler_delegate(entry, f"assistant.{kind}[{index}]", found, handlers, violations)
            if entry.assistant:
                violations.add(field, "name an assistant or a handler, not both")
        else:
            _other(entry, workspace_id, own_id, kind, field, found, violations)
        if handlers and set(handlers.values()) & set(found.values()):
            # Both would be offered as ask_{id}: the model could not tell them apart.
            shared = sorted(set(handlers.values()) & set(found.values()))[0]
            violations.add(
                f"assistant.{kind}[{index}]",
                f"an assistant and a handler both named {shared} (each offered as ask_{shared})",
            )
            handlers.clear()
        if isinstance(entry, pb.AssistantHandoff) and entry.history not in _HISTORIES:
            violations.add(f"assistant.{kind}[{index}].history", "is not a HandoffHistory")
        if len(entry.description) > MAX_DELEGATE_DESCRIPTION:
            violations.add(
                f"assistant.{kind}[{index}].description",
                f"is longer than {MAX_DELEGATE_DESCRIPTION:,} characters",
            )
    return found


async def _input_schemas(delegates: Sequence[pb.AssistantDelegate], violations: Violations) -> None:
    """A violation on each delegate's ``input_schema`` that is too large, not an object's
    schema, or not a schema the platform can apply (compiled off the loop: a schema is
    the caller's, and its size is bounded first)."""
    for index, delegate in enumerate(delegates):
        if not delegate.HasField("input_schema"):
            continue
        field = f"assistant.delegates[{index}].input_schema"
        if delegate.input_schema.ByteSize() > MAX_INPUT_SCHEMA_BYTES:
            violations.add(field, f"is larger than {MAX_INPUT_SCHEMA_BYTES // 1024} KiB")
            continue
        schema = structs.plain_struct(delegate.input_schema)
        if schema.get("type") != "object":
            violations.add(field, 'must be the schema of an object ("type": "object")')
            continue
        compiled = await asyncio.to_thread(compile_schema, schema)
        if compiled.problem:
            violations.add(field, f"is not a schema that can be applied: {compiled.problem}")


def _handler_delegate(
    entry: pb.AssistantDelegate,
    prefix: str,
    found: dict[str, str],
    handlers: dict[str, str] | None,
    violations: Violations,
) -> None:
    """A delegate that names a handler: a handler's name, named once, whose ``ask_{id}``
    is no assistant delegate's too."""
    field = f"{prefix}.handler"
    handler = HandlerName.parse_or_none(entry.handler)
    if handler is None or handlers is None:
        violations.add(field, "must be handlers/{handler}")
    elif handler.handler in handlers.values():
        violations.add(field, f"{entry.handler} is named twice")
    else:
        handlers[field] = handler.handler


def _other(
    entry: pb.AssistantDelegate | pb.AssistantHandoff,
    workspace_id: str,
    own_id: str,
    kind: str,
    field: str,
    found: dict[str, str],
    violations: Violations,
) -> None:
    named = AssistantName.parse_or_none(entry.assistant)
    if named is None or named.workspace != workspace_id:
        violations.add(field, f"must be an assistant of {WorkspaceName(workspace_id)}")
    elif named.assistant == own_id:
        violations.add(field, f"an assistant cannot name itself in its {kind}")
    elif named.assistant in found.values():
        violations.add(field, f"{entry.assistant} is named twice")
    else:
        found[field] = named.assistant


class AssistantRules:
    """The checks of one dispatcher's assistants, with what they look up."""

    def __init__(
        self,
        limits: AssistantLimits,
        *,
        handler_exists: Callable[[str, str], Awaitable[bool]],
        integration_exists: Callable[[str], Awaitable[bool]],
        assistants: Callable[[str], Awaitable[Collection[str]]],
        check_filter: FilterCheck | None = None,
    ) -> None:
        self.limits = limits
        self._handler_exists = handler_exists
        self._integration_exists = integration_exists
        #: The ids of a workspace's assistants, as stored now.
        self._assistants = assistants
        self._check_filter = check_filter

    async def settings(
        self, workspace_id: str, given: pb.Assistant, paths: Sequence[str], fallback_name: str
    ) -> pb.Assistant:
        """The stored settings of ``given``'s ``paths`` (INVALID_ARGUMENT naming each bad field)."""
        violations = Violations()
        clean = pb.Assistant()
        self._texts(given, paths, fallback_name, clean, violations)
        self._numbers(given, paths, clean, violations)
        self._nested(workspace_id, given, paths, clean, violations)
        lookups: dict[str, str] = {}
        if "tools" in paths:
            lookups = self._tools(workspace_id, given.tools, violations)
            clean.tools.extend(given.tools)
        # Kept only where the paths name them (an update's mask copies no more).
        # The handlers delegates name instead of assistants, by the field naming each.
        asked: dict[str, str] = {}
        others = {
            **(
                _others(
                    workspace_id,
                    fallback_name,
                    [*given.delegates],
                    "delegates",
                    violations,
                    asked,
                )
                if "delegates" in paths
                else {}
            ),
            **(
                _others(workspace_id, fallback_name, [*given.handoffs], "handoffs", violations)
                if "handoffs" in paths
                else {}
            ),
        }
        clean.delegates.extend(given.delegates)
        clean.handoffs.extend(given.handoffs)
        handler_id = ""
        if "handler" in paths and given.handler:
            handler = HandlerName.parse_or_none(given.handler)
            if handler is None:
                violations.add("assistant.handler", "must be handlers/{handler}, or empty for llm")
            else:
                handler_id = handler.handler
            clean.handler = given.handler
        # The cheap checks first: a request they refuse costs no lookups.
        violations.check()
        if handler_id and not await self._handler_exists(workspace_id, handler_id):
            violations.add(
                "assistant.handler",
                f"names no handler of this workspace ({given.handler}); see ListHandlers",
            )
        if lookups:
            exists = await asyncio.gather(*(self._integration_exists(n) for n in lookups))
            for (integration, field), there in zip(lookups.items(), exists, strict=True):
                if not there:
                    violations.add(field, f"names no integration of this workspace ({integration})")
        await self._others_exist(workspace_id, others, violations)
        await self._handlers_exist(workspace_id, asked, violations)
        if "delegates" in paths:
            await _input_schemas(given.delegates, violations)
        violations.check()
        return clean

    async def _handlers_exist(
        self, workspace_id: str, asked: dict[str, str], violations: Violations
    ) -> None:
        """A violation on each field naming a handler the workspace does not have."""
        there = await asyncio.gather(
            *(self._handler_exists(workspace_id, h) for h in asked.values())
        )
        for (field, handler_id), exists in zip(asked.items(), there, strict=True):
            if not exists:
                violations.add(
                    field,
                    f"names no handler of this workspace (handlers/{handler_id}); see ListHandlers",
                )

    async def _others_exist(
        self, workspace_id: str, others: dict[str, str], violations: Violations
    ) -> None:
        """A violation on each field naming an assistant the workspace does not have."""
        if not others:
            return
        known = await self._assistants(workspace_id)
        for field, assistant_id in others.items():
            if assistant_id not in known:
                named = AssistantName(workspace_id, assistant_id)
                violations.add(field, f"names no assistant of this workspace ({named})")

    @staticmethod
    def _texts(
        given: pb.Assistant,
        paths: Sequence[str],
        fallback_name: str,
        clean: pb.Assistant,
        violations: Violations,
    ) -> None:
        if "display_name" in paths:
            display_name = given.display_name.strip()
            if len(display_name) > MAX_DISPLAY_NAME:
                violations.add(
                    "assistant.display_name", f"is longer than {MAX_DISPLAY_NAME} characters"
                )
            clean.display_name = display_name or fallback_name
        if "description" in paths:
            if len(given.description) > MAX_DESCRIPTION:
                violations.add(
                    "assistant.description", f"is longer than {MAX_DESCRIPTION} characters"
                )
            clean.description = given.description
        if "instructions" in paths:
            if len(given.instructions) > MAX_INSTRUCTIONS:
                violations.add(
                    "assistant.instructions", f"is longer than {MAX_INSTRUCTIONS} characters"
                )
            clean.instructions = given.instructions

    def _numbers(
        self, given: pb.Assistant, paths: Sequence[str], clean: pb.Assistant, violations: Violations
    ) -> None:
        if "context_token_budget" in paths:
            budget = given.context_token_budget
            if budget and not MIN_CONTEXT_BUDGET <= budget <= MAX_CONTEXT_BUDGET:
                violations.add(
                    "assistant.context_token_budget",
                    f"must be 0 (the handler's own) or {MIN_CONTEXT_BUDGET:,} to "
                    f"{MAX_CONTEXT_BUDGET:,}",
                )
            clean.context_token_budget = budget
        if "max_tool_steps" in paths:
            if not 0 <= given.max_tool_steps <= self.limits.max_tool_steps:
                violations.add(
                    "assistant.max_tool_steps",
                    f"must be 0 (the server's default) to {self.limits.max_tool_steps}",
                )
            clean.max_tool_steps = given.max_tool_steps

    def _nested(
        self,
        workspace_id: str,
        given: pb.Assistant,
        paths: Sequence[str],
        clean: pb.Assistant,
        violations: Violations,
    ) -> None:
        """The settings held in messages of their own."""
        if "model" in paths and given.HasField("model"):
            self._model(given.model, violations)
            clean.model.CopyFrom(given.model)
        if "voice" in paths and given.HasField("voice"):
            _voice(given.voice, violations)
            clean.voice.CopyFrom(given.voice)
        if "retrieval" in paths and given.HasField("retrieval"):
            _retrieval(given.retrieval, workspace_id, self._check_filter, violations)
            clean.retrieval.CopyFrom(given.retrieval)
        if "memory_policy" in paths and given.HasField("memory_policy"):
            self._memory_policy(given.memory_policy, violations)
            clean.memory_policy.CopyFrom(given.memory_policy)

    def _memory_policy(self, policy: context_pb2.MemoryPolicy, violations: Violations) -> None:
        """The policy's own rules, and a provider it names must be configured (the
        workspace's default takes the same check in the context service)."""
        memorypolicy.check_policy(
            policy, "assistant.memory_policy", violations, max_items=self.limits.max_memory_items
        )
        if policy.provider and policy.provider not in self.limits.providers:
            configured = ", ".join(self.limits.providers) or "none"
            violations.add(
                "assistant.memory_policy.provider",
                f"is not a configured provider (configured: {configured}); empty for the "
                "assistant's",
            )

    def _model(self, model: handler_pb2.ModelSettings, violations: Violations) -> None:
        if model.provider and model.provider not in self.limits.providers:
            configured = ", ".join(self.limits.providers) or "none"
            violations.add(
                "assistant.model.provider",
                f"is not a configured provider (configured: {configured}); empty for the chain",
            )
        if len(model.model) > MAX_MODEL_NAME:
            violations.add("assistant.model.model", f"is longer than {MAX_MODEL_NAME} characters")
        # ``not a <= x <= b`` also refuses NaN.
        if model.HasField("temperature") and not 0.0 <= model.temperature <= MAX_TEMPERATURE:
            violations.add("assistant.model.temperature", f"must be 0 to {MAX_TEMPERATURE:g}")
        if model.HasField("top_p") and not 0.0 <= model.top_p <= 1.0:
            violations.add("assistant.model.top_p", "must be 0 to 1")
        if not 0 <= model.max_output_tokens <= self.limits.max_output_tokens:
            violations.add(
                "assistant.model.max_output_tokens",
                f"must be 0 (the server's default) to {self.limits.max_output_tokens}",
            )

    def _tools(
        self, workspace_id: str, entries: Sequence[pb.AssistantTools], violations: Violations
    ) -> dict[str, str]:
        """Check the form of the tool entries; returns the integrations still to be
        looked up, each with the field that named it."""
        if len(entries) > MAX_TOOL_ENTRIES:
            violations.add("assistant.tools", f"may name at most {MAX_TOOL_ENTRIES} integrations")
            return {}
        lookups: dict[str, str] = {}
        seen: set[str] = set()
        for index, entry in enumerate(entries):
            field = f"assistant.tools[{index}]"
            integration = IntegrationName.parse_or_none(entry.integration)
            if integration is None:
                violations.add(
                    f"{field}.integration",
                    "must be workspaces/{w}/integrations/{i}"
                    if entry.integration
                    else "is required",
                )
            elif integration.workspace != workspace_id:
                violations.add(f"{field}.integration", "must be an integration of this workspace")
            elif entry.integration in seen:
                violations.add(f"{field}.integration", "is named by an earlier entry")
            else:
                seen.add(entry.integration)
                lookups[entry.integration] = f"{field}.integration"
            tools = self._tool_names(entry.tools, f"{field}.tools", violations)
            required = self._tool_names(
                entry.approval_required_tools, f"{field}.approval_required_tools", violations
            )
            if tools:
                for position, tool in enumerate(entry.approval_required_tools):
                    if tool in required and tool not in tools:
                        violations.add(
                            f"{field}.approval_required_tools[{position}]",
                            f"is not one of the entry's tools ({tool})",
                        )
        return lookups

    @staticmethod
    def _tool_names(values: Sequence[str], field: str, violations: Violations) -> set[str]:
        if len(values) > MAX_TOOLS_PER_ENTRY:
            violations.add(field, f"may name at most {MAX_TOOLS_PER_ENTRY} tools")
            return set()
        valid: set[str] = set()
        for index, value in enumerate(values):
            if names.tool_from_segment(value) is None:
                violations.add(
                    f"{field}[{index}]",
                    "must be a tool's segment as ListTools names it: 1-128 letters, digits, "
                    "'_', '.', '-' or ~XX escapes",
                )
            elif value in valid:
                violations.add(f"{field}[{index}]", f"repeats {value}")
            else:
                valid.add(value)
        return valid

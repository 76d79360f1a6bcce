"""Handoffs: an assistant hands its conversation over to another assistant.

An assistant's ``handoffs`` are offered to its model as ``transfer_to_{assistant id}``
tools (input: the reason). A call makes that assistant the conversation's holder
(``assistants/holders.py``): the conversation's later messages that name no assistant
go to it, with its instructions, tools and model, until it hands over again (back,
or on). The call and its result are stored in the conversation like any tool step,
so the history says who took over and why, and the run's updates say so too
(``RunUpdate.handoff``). The handing run goes on to its answer (its model is told to
say, briefly, who takes over).

What the holder sees of the conversation is the handoff's ``history``: all of it, only
what came from the handoff on, or (``HANDOFF_HISTORY_SUMMARY``) that and a summary of
what came before, which the handing model writes as the call's ``summary`` argument
(no model call of its own: the handing model knows the conversation, and its call is
journaled like any). The summary is in the call's result, the first thing of the
conversation the holder sees.

A message that names an assistant goes to it whoever holds the conversation, and
does not change the holder. A handoff is a write of one row, made again with the
same values if a crash sends the call again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from google.protobuf import struct_pb2

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.dispatcher.assistants.catalog import Assistants
from switchboard.dispatcher.assistants.holders import Holder
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.delegation.offer import about, named_tool
from switchboard.dispatcher.tools.runner import string_tool
from switchboard.platform.errors import SwitchboardError
from switchboard.platform.security.policy import Principal
from switchboard.platform.values.resources import AssistantName

#: The tool's argument, and how long it may be.
REASON: Final = "reason"
MAX_REASON_CHARS: Final = 1_000
#: The summary a ``HANDOFF_HISTORY_SUMMARY`` handoff asks for too, and its bound.
SUMMARY: Final = "summary"
MAX_SUMMARY_CHARS: Final = 8_000
_SINCE: Final = frozenset({pb.HANDOFF_HISTORY_SINCE_HANDOFF, pb.HANDOFF_HISTORY_SUMMARY})
_PREFIX: Final = "transfer_to_"


def tool_name(assistant_id: str) -> str:
    """The function name a handoff is offered under (``transfer_to_{id}``, hashed to fit)."""
    return named_tool(_PREFIX, assistant_id)


def definition(handoff: pb.AssistantHandoff, target: pb.Assistant) -> hpb.ToolDefinition:
    """The tool the model is offered for ``handoff`` (``target``: the assistant, as stored)."""
    target_id, title, description = about(
        target, handoff.description, "Hand the conversation to {title}."
    )
    summary: tuple[tuple[str, str], ...] = ()
    if handoff.history == pb.HANDOFF_HISTORY_SUMMARY:
        summary = (
            (
                SUMMARY,
                f"What {title} needs to know of the conversation so far (it sees only this "
                "and what comes after the handoff): who the person is, what they asked, "
                f"what was found or decided, what is still open; at most {MAX_SUMMARY_CHARS:,} "
                "characters.",
            ),
        )
    return string_tool(
        tool_name(target_id),
        f"Hand the conversation over to {title}: {description}",
        REASON,
        f"Why {title} should take the conversation over.",
        *summary,
    )


class Handoffs:
    """The tools a run's assistant offers for its handoffs, and the built-ins that
    make them (see the module doc)."""

    def __init__(self, assistants: Assistants) -> None:
        self._assistants = assistants

    async def definitions(self, assistant: pb.Assistant) -> list[hpb.ToolDefinition]:
        """The handoff tools of ``assistant`` (a target deleted since is left out)."""
        if not assistant.handoffs:
            return []
        workspace = AssistantName.parse(assistant.name, "assistant").workspace
        found: list[hpb.ToolDefinition] = []
        for handoff in assistant.handoffs:
            try:
                target = await self._assistants.resolve(workspace, handoff.assistant)
            except SwitchboardError:
                continue
            if target is not None:
                found.append(definition(handoff, target))
        return found

    def builtins(
        self,
        active: Active,
        emit: Callable[[pb.RunUpdate], None],
        definitions: Sequence[hpb.ToolDefinition],
    ) -> dict[str, HandOver]:
        """The built-in tools of one run: one per handoff offered."""
        assistant = active.assistant
        if assistant is None or not assistant.handoffs:
            return {}
        offered = {d.tool for d in definitions}
        found: dict[str, HandOver] = {}
        for handoff in assistant.handoffs:
            named = AssistantName.parse_or_none(handoff.assistant)
            if named is not None and tool_name(named.assistant) in offered:
                found[tool_name(named.assistant)] = HandOver(
                    self._assistants,
                    active,
                    named,
                    emit,
                    since_handoff=handoff.history in _SINCE,
                    summary=handoff.history == pb.HANDOFF_HISTORY_SUMMARY,
                )
        return found


class HandOver:
    """One handoff target of one run, as a built-in tool (``tools.runner.BuiltinTool``)."""

    def __init__(
        self,
        assistants: Assistants,
        active: Active,
        target: AssistantName,
        emit: Callable[[pb.RunUpdate], None],
        *,
        since_handoff: bool = False,
        summary: bool = False,
    ) -> None:
        self._assistants = assistants
        self._active = active
        self._target = target
        self._emit = emit
        self._since_handoff = since_handoff
        #: Whether the call must bring a summary of the conversation for its target.
        self._summary = summary

    @property
    def definition(self) -> hpb.ToolDefinition:
        name = tool_name(self._target.assistant)
        return hpb.ToolDefinition(tool=name, function_name=name)

    async def run(
        self,
        principal: Principal,
        arguments: struct_pb2.Struct,
        *,
        timeout_s: float,
        call_id: str = "",
    ) -> tuple[bool, str]:
        given = arguments.fields.get(REASON)
        if given is None or given.WhichOneof("kind") != "string_value" or not given.string_value:
            return False, f"The call needs {REASON!r}: why the other assistant should take over."
        reason = given.string_value.strip()[:MAX_REASON_CHARS]
        summary = ""
        if self._summary:
            written = arguments.fields.get(SUMMARY)
            if written is None or written.WhichOneof("kind") != "string_value":
                return False, (
                    f"The call needs {SUMMARY!r}: what {self._target.assistant} needs to know "
                    "of the conversation so far (it sees nothing before the handoff)."
                )
            summary = written.string_value.strip()
            if not summary:
                return False, f"{SUMMARY!r} is empty: write what the conversation was about."
            if len(summary) > MAX_SUMMARY_CHARS:
                return False, (
                    f"{SUMMARY!r} is longer than {MAX_SUMMARY_CHARS:,} characters: shorten it."
                )
        active = self._active
        await self._assistants.hand_over(
            active.workspace_id,
            active.conversation_id,
            Holder(self._target.assistant, active.run_id, reason, self._since_handoff),
        )
        update = pb.RunUpdate()
        update.handoff.from_assistant = active.run.assistant
        update.handoff.to_assistant = str(self._target)
        update.handoff.reason = reason
        self._emit(update)
        said = (
            f"The conversation is now with {self._target.assistant} ({reason}): the next "
            "messages go to it. Tell the person, in a sentence, who takes over."
        )
        if summary:
            # The holder sees this result and nothing before it: the summary goes in it.
            said += f"\n\nThe conversation so far, in summary:\n{summary}"
        return True, said

"""A delegate as the tool a parent's model is offered: ``ask_{id}``, its one string
argument or the delegate's own input schema."""

from __future__ import annotations

from typing import Final

from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.dispatcher.tools.runner import fitted_name, string_tool
from switchboard.platform.values.resources import AssistantName

#: The tool's one argument, and how long a question may be.
INPUT: Final = "input"
MAX_INPUT_CHARS: Final = 32_000
#: A delegate's tool name: ``ask_`` and its id, within the 64 characters models take.
_PREFIX: Final = "ask_"


def tool_name(assistant_id: str) -> str:
    """The function name a delegate is offered under (``ask_{id}``, hashed to fit)."""
    return named_tool(_PREFIX, assistant_id)


def named_tool(prefix: str, target_id: str) -> str:
    """The function name an assistant (or handler) ``target_id`` is offered under after
    ``prefix`` (``ask_``, ``transfer_to_``), hashed to fit the 64 characters models take."""
    return fitted_name(prefix + target_id, target_id)


def about(
    target: pb.Assistant | hpb.HandlerCapabilities, said: str, otherwise: str
) -> tuple[str, str, str]:
    """What a tool offering ``target`` tells the model of it: the target's id, its title,
    and a description: the offer's own (``said``), else the target's, else ``otherwise``
    with ``{title}`` filled in. A delegate's tool and a handoff's say it alike."""
    if isinstance(target, pb.Assistant):
        target_id = AssistantName.parse(target.name, "assistant").assistant
    else:
        target_id = target.id
    title = target.display_name or target_id
    return target_id, title, said or target.description or otherwise.format(title=title)


def definition(
    delegate: pb.AssistantDelegate, target: pb.Assistant | hpb.HandlerCapabilities
) -> hpb.ToolDefinition:
    """The tool the parent's model is offered for ``delegate`` (``target``: the
    assistant it names, as stored, or the handler, as its capabilities say)."""
    kind = "the assistant" if isinstance(target, pb.Assistant) else "the handler"
    target_id, title, description = about(
        target, delegate.description, f"Ask {kind} {{title}} and get its answer."
    )
    name = tool_name(target_id)
    if delegate.HasField("input_schema"):
        return hpb.ToolDefinition(
            tool=name,
            function_name=name,
            description=description,
            input_schema=delegate.input_schema,
        )
    return string_tool(
        name,
        description,
        INPUT,
        f"What to ask {title}: the whole question, with what it needs to answer (it does not "
        "see this conversation).",
    )

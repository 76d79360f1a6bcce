"""What an assistant can do to the phone call it is answering: its built-in tools.

Offered to a run whose conversation is a live call of this process (``Calls.offered``),
beside the assistant's own tools (``tools.runner.ConversationTools``), and recorded on
the run as any tool call is:

- ``end_call``: hang up once the answer being written has been spoken (the run ends, and
  the call's queued speech plays out), so a goodbye is heard whole;
- ``transfer_call``: hand the caller to a person, one of the rule's ``transfer``
  destinations by name (a blind transfer: SIP REFER, after the answer has been spoken);
  the model can name no other address;
- ``send_keys``: press keys on the call (RFC 4733), as to work another system's menu
  (offered only where keys can be sent: not on a carrier's media stream, ``streams/``).

Each answers at once with what will happen; a call that has ended meanwhile answers
``(False, "the call has ended")``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from google.protobuf import json_format, struct_pb2

from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.platform.security.policy import Principal

END_CALL: Final = "end_call"
TRANSFER_CALL: Final = "transfer_call"
SEND_KEYS: Final = "send_keys"
_KEYS: Final = re.compile(r"^[0-9*#A-Da-d]{1,32}$")


@dataclass(frozen=True)
class CallActions:
    """What the tools do to one call (``calls.py`` binds them to it)."""

    live: Callable[[], bool]
    hang_up_after_speech: Callable[[str], None]
    transfer_after_speech: Callable[[str, str], None]
    send_keys: Callable[[str], None]
    #: The rule's transfer destinations, name to SIP URI.
    destinations: Mapping[str, str]
    #: Whether the call can press keys (a carrier's media stream cannot): ``send_keys``
    #: is offered only where it works.
    keys: bool = True


def definitions(destinations: Mapping[str, str], *, keys: bool = True) -> list[hpb.ToolDefinition]:
    found = [
        _definition(
            END_CALL,
            "End the phone call once this answer has been spoken. Use it when the caller "
            "says goodbye or asks you to hang up; say goodbye in the same answer.",
            {"reason": {"type": "string", "maxLength": 200, "description": "why, for the log"}},
            [],
        ),
        _definition(
            SEND_KEYS,
            "Press keys on the phone call (DTMF tones), as to work another system's menu.",
            {
                "keys": {
                    "type": "string",
                    "pattern": _KEYS.pattern,
                    "description": "the keys, in order: digits, *, #, A to D",
                }
            },
            ["keys"],
        ),
    ]
    if not keys:
        found = [d for d in found if d.tool != SEND_KEYS]
    if destinations:
        found.append(
            _definition(
                TRANSFER_CALL,
                "Transfer the caller to a person once this answer has been spoken (tell them "
                "you are transferring them). Destinations: " + ", ".join(sorted(destinations)),
                {"destination": {"type": "string", "enum": sorted(destinations)}},
                ["destination"],
            )
        )
    return found


class CallTool:
    """One of the tools, bound to one call (``tools.runner.BuiltinTool``)."""

    def __init__(self, name: str, actions: CallActions, definition: hpb.ToolDefinition) -> None:
        self._name = name
        self._actions = actions
        self.definition = definition

    async def run(
        self,
        principal: Principal,
        arguments: struct_pb2.Struct,
        *,
        timeout_s: float,
        call_id: str = "",
    ) -> tuple[bool, str]:
        del principal, timeout_s, call_id  # the call is the conversation's, already held
        given = json_format.MessageToDict(arguments)
        actions = self._actions
        if not actions.live():
            return False, "the call has ended"
        if self._name == END_CALL:
            reason = given.get("reason", "")
            actions.hang_up_after_speech(str(reason)[:200] if reason else "the assistant ended it")
            return True, "The call will end once this answer has been spoken."
        if self._name == SEND_KEYS:
            keys = given.get("keys")
            if not isinstance(keys, str) or not _KEYS.match(keys):
                return False, "keys: 1 to 32 of 0-9, *, #, A-D"
            actions.send_keys(keys.upper())
            return True, f"Pressed {keys.upper()}."
        destination = given.get("destination")
        target = actions.destinations.get(destination) if isinstance(destination, str) else None
        if target is None:
            names = ", ".join(sorted(actions.destinations))
            return False, f"destination: one of {names}"
        actions.transfer_after_speech(str(destination), target)
        return True, f"The caller will be transferred to {destination} once this answer ends."


def bound(actions: CallActions) -> dict[str, CallTool]:
    offered = definitions(actions.destinations, keys=actions.keys)
    return {d.tool: CallTool(d.tool, actions, d) for d in offered}


def _definition(
    name: str, description: str, properties: dict[str, Any], required: list[str]
) -> hpb.ToolDefinition:
    definition = hpb.ToolDefinition(tool=name, function_name=name, description=description)
    definition.input_schema.update(
        {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
        }
    )
    return definition

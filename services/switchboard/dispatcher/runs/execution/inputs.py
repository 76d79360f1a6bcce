"""What a run reads before its handler: its context window, the tools its assistant
offers, the budgets that apply.

The reads go out together (one wait on the path to the first delta): the check
that the caller may still write to the conversation, the window, the listing of
the assistant's tools, the budgets when admission's read no longer stands, and
what delegation adds (its tools, and where the history a handoff's target sees
begins). Nothing reaches the handler unless all succeed.

Why a module of its own: this read is the first thing a started run waits for,
and its shape (what is gathered with what, to keep tasks off the path to the
first delta) is a concern of its own, apart from the handler's step that
follows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.budgets.spending import Read
from switchboard.dispatcher.llm.retrieval import retrieval_options, search_memory_definition
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.dispatcher.runs.core.active.lifecycle import Active
from switchboard.dispatcher.runs.delegation.delegation import NO_OFFER, Delegation, Offer
from switchboard.dispatcher.runs.execution.charges import Charges
from switchboard.dispatcher.tools.port import ToolPort
from switchboard.dispatcher.tools.runner import ConversationTools, offered_tools
from switchboard.platform.security.policy import Permission, Policy


@dataclass(frozen=True)
class Inputs:
    """What a run read before its handler (``InputReader.read``)."""

    window: cpb.ContextWindow
    #: The tools its assistant offers (and the memory search, if it offers that).
    definitions: list[handler_pb2.ToolDefinition]
    #: The budgets that apply (None: no budgets here).
    budgets: Read | None


class InputReader:
    """Reads each run's inputs as it starts."""

    def __init__(
        self,
        *,
        policy: Policy,
        context: ContextPort,
        tools: ToolPort,
        charges: Charges,
        delegation: Delegation | None,
        conversation_tools: ConversationTools | None = None,
    ) -> None:
        self._policy = policy
        self._context = context
        self._tools = tools
        self._charges = charges
        self._delegation = delegation
        self._conversation_tools = conversation_tools

    async def read(self, active: Active, left: Callable[[], float]) -> Inputs:
        """What the run reads before its handler: its context window, the tools its
        assistant offers, the budgets that apply."""
        assistant = active.assistant
        budget = (
            (assistant.context_token_budget if assistant is not None else 0)
            or active.handler.capabilities.max_context_tokens
            or 4000
        )
        # The member may have left since the message was queued. Checked
        # alongside the window read (and the listing of the assistant's
        # tools: one wait on the path to the first delta); nothing reaches
        # the handler unless all succeed.
        reads = asyncio.gather(
            self._policy.authorize(
                active.principal, active.conversation, Permission.WRITE, "conversation"
            ),
            self._context.window(
                active.principal,
                cpb.GetContextWindowRequest(
                    conversation=active.conversation,
                    token_budget=budget,
                    # The run's branch, not whichever is active when it starts.
                    branch=active.run.branch,
                    retrieval=retrieval_options(assistant.retrieval, budget)
                    if assistant is not None and assistant.retrieval.enabled
                    else None,
                ),
                timeout_s=left(),
            ),
        )
        definitions: list[handler_pb2.ToolDefinition] = []
        # Admission's read of the budgets, when nothing changed here since: the
        # common case waits for nothing more than the window (each coroutine
        # gathered is one more task on the path to the first delta).
        budgets = self._charges.admitted(active)
        reread = self._charges.enabled and budgets is None
        delegates = (
            self._delegation is not None
            and assistant is not None
            and (assistant.delegates or assistant.handoffs)
        )
        if assistant is not None and (
            assistant.tools or assistant.retrieval.search_tool or delegates
        ):
            (_, window), (definitions, _), read, offer = await asyncio.gather(
                reads,
                offered_tools(self._tools, active.principal, assistant),
                self._charges.read(active) if reread else _nothing(),
                self._offer(active),
            )
            budgets = read if reread else budgets
            if assistant.retrieval.search_tool:
                definitions.append(search_memory_definition())
            definitions.extend(offer.definitions)
        else:
            if reread:
                (_, window), budgets = await asyncio.gather(reads, self._charges.read(active))
            else:
                _, window = await reads
            offer = await self._offer(active)
        if offer.since is not None:
            _since(window, offer.since)
        if self._conversation_tools is not None and assistant is not None:
            held = self._conversation_tools.tools(active.conversation)
            definitions.extend(tool.definition for tool in held.values())
        return Inputs(window, definitions, budgets)

    async def _offer(self, active: Active) -> Offer:
        """What delegation adds to the run's read (one hook: its tools, and where the
        history its model sees begins); nothing without delegation."""
        if self._delegation is None:
            return NO_OFFER
        return await self._delegation.offer(active)


def _since(window: cpb.ContextWindow, since: dt.datetime) -> None:
    """Leave out of ``window`` the messages from before ``since`` (a handoff whose target
    sees only what came from it on); memory and retrieved passages stay."""
    kept = [
        item
        for item in window.included
        if not item.HasField("message") or item.message.create_time.ToDatetime(dt.UTC) >= since
    ]
    if len(kept) < len(window.included):
        del window.included[:]
        window.included.extend(kept)
        window.total_tokens = sum(item.token_count for item in kept)


async def _nothing() -> None:
    return None

"""Deciding what an exchange teaches: the model's two structured answers, made a plan.

1. The exchange's messages (read through the context port as the run's creator)
   and the conversation's summary and recent turns (a small context window) go to
   the model, which answers candidate facts (``schema.CANDIDATES``): at most the
   policy's ``max_candidates``, each of a category it keeps.
2. For each candidate, the most similar current memories of its scope are found
   (SearchMemoryItems on ``users/{u}`` limited to this workspace's items, or on
   ``workspaces/{w}``), shown to the model under short handles, and the model
   answers one decision per candidate (``schema.DECISIONS``): add, update (the
   handle it replaces), invalidate (the handle no longer true), none.
3. The plan (``plan.decide``): handles back to names, additions past a scope's
   ``max_items`` made NONE ("scope full"), each item's id derived from the round.

An answer that breaks its schema is asked once more; a second is ``Unusable``.
Nothing here writes: the worker stores the plan before anything is applied.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.handler.v1 import handler_pb2
from switchboard.dispatcher.handlers.base import text_of
from switchboard.dispatcher.llm.config import Provider
from switchboard.dispatcher.memory.model import FormingModel
from switchboard.dispatcher.memory.plans.plan import Exchange, Plan, decide, plan_key, scope_of
from switchboard.dispatcher.memory.plans.schema import (
    CANDIDATES,
    DECISIONS,
    Candidate,
    Choice,
    Unusable,
    candidates_schema,
    decisions_schema,
    parse_candidates,
    parse_choices,
)
from switchboard.dispatcher.memory.store import Job
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.platform.errors import NotFound
from switchboard.platform.security.policy import Principal
from switchboard.platform.values import memorypolicy
from switchboard.platform.values.memorypolicy import CATEGORY_WORDS
from switchboard.platform.values.names import now

#: Characters of one message given to the model at most.
MAX_MESSAGE_CHARS: Final = 8000
_PAGE: Final = 100

_EXTRACT: Final = (
    "You read one exchange of a conversation between a person and an assistant and pick "
    "out the durable facts worth remembering for later conversations. Answer JSON only, "
    "as the schema says. Each fact is one short, self-contained sentence about the person "
    "(third person: 'Lives in Berlin.') or about the workspace, of one of these "
    "categories: {categories}. State a change as the new state ('Moved to Berlin.'), and a "
    "retraction as what is now true ('No longer eats meat.'). valid_from is when the fact "
    "became true if the conversation says so (ISO 8601), else null; confidence is how sure "
    "you are, 0 to 1. Leave out small talk, the assistant's own words, and anything the "
    "person did not state or clearly imply. At most {limit} facts; none is a fine answer."
)
_CATEGORY_HELP: Final = {
    "preference": "preference (what the person likes, wants, or how they want answers)",
    "person_fact": "person_fact (facts about the person: home, work, family, skills)",
    "plan": "plan (the person's plans, appointments and dates)",
    "workspace_fact": "workspace_fact (facts about the team, project or workspace that "
    "hold for everyone in it)",
}
_DECIDE: Final = (
    "You keep a memory current. For each candidate fact you are shown the most similar "
    "memories already kept, each under a handle. Decide once per candidate: 'add' when it "
    "is new; 'update' when it changes one of the memories shown (target: that handle; the "
    "old one is retired); 'invalidate' when it says a memory shown is no longer true and "
    "there is nothing new to keep (target: that handle); 'none' when it is already known "
    "or not worth keeping. target is null for add and none. reason: a few words. Answer "
    "JSON only, as the schema says."
)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


class Former:
    """Asks the model what an exchange teaches."""

    def __init__(
        self,
        context: ContextPort,
        model: FormingModel,
        *,
        timeout_s: float,
        similar: int,
        context_tokens: int,
    ) -> None:
        self._context = context
        self._model = model
        self._timeout_s = timeout_s
        self._similar = similar
        self._context_tokens = context_tokens

    async def _messages(
        self, principal: Principal, exchange: Exchange
    ) -> tuple[list[dict[str, str]], tuple[str, ...]]:
        turns: list[dict[str, str]] = []
        sources: list[str] = []
        for turn in exchange.turns:
            for name, role in ((turn.input_message, "user"), (turn.output_message, "assistant")):
                if not name:
                    continue
                try:
                    message = await self._context.message(
                        principal, name, timeout_s=self._timeout_s
                    )
                except NotFound:
                    continue  # deleted since: nothing of it is remembered
                turns.append(
                    {"role": role, "time": turn.time.isoformat(), "text": _clip(text_of(message))}
                )
                sources.append(name)
        return turns, tuple(sources)

    async def _background(
        self, principal: Principal, conversation: str, own: Sequence[str]
    ) -> tuple[str, list[dict[str, str]]]:
        """The conversation's summary and its recent turns before the exchange."""
        try:
            window = await self._context.window(
                principal,
                cpb.GetContextWindowRequest(
                    conversation=conversation, token_budget=self._context_tokens
                ),
                timeout_s=self._timeout_s,
            )
        except NotFound:
            return "", []
        summary, recent = "", []
        for item in window.included:
            if item.WhichOneof("item") != "message" or item.message.name in own:
                continue
            message = item.message
            if item.reason == cpb.CONTEXT_ITEM_REASON_SUMMARY:
                summary = _clip(message.summary or text_of(message))
            elif item.reason == cpb.CONTEXT_ITEM_REASON_RECENT:
                role = "assistant" if message.role == cpb.MESSAGE_ROLE_ASSISTANT else "user"
                recent.append({"role": role, "text": _clip(text_of(message))})
        return summary, recent

    async def _structured(
        self,
        job: Job,
        chain: tuple[Provider, ...],
        system: str,
        content: dict[str, Any],
        name: str,
        schema: dict[str, Any],
        parse: Any,
    ) -> tuple[Any, str]:
        """An answer parsed by ``parse``, asked again once if it breaks the schema."""
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": json.dumps(content, ensure_ascii=False)},
        ]
        for attempt in (1, 2):
            answered = await self._model.ask(job.workspace_id, chain, messages, name, schema)
            try:
                return parse(answered.text), answered.model
            except Unusable:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def form(self, job: Job, exchange: Exchange) -> Plan | None:
        """The plan of ``job``'s exchange; None when it has nothing to form."""
        principal = Principal.acting_for(exchange.user_id)
        policy = cpb.MemoryPolicy.FromString(exchange.policy)
        effective = memorypolicy.effective(policy)
        if not effective.on:
            return None
        chain = self._model.chain(policy, handler_pb2.ModelSettings.FromString(exchange.model))
        turns, sources = await self._messages(principal, exchange)
        if not any(turn["role"] == "user" for turn in turns):
            return None
        summary, recent = await self._background(principal, job.conversation, sources)
        kept = sorted(effective.categories)
        words = ", ".join(_CATEGORY_HELP[CATEGORY_WORDS[c]] for c in kept)
        candidates: list[Candidate]
        candidates, model = await self._structured(
            job,
            chain,
            _EXTRACT.format(categories=words, limit=effective.max_candidates),
            {"now": now().isoformat(), "summary": summary, "recent": recent, "exchange": turns},
            CANDIDATES,
            candidates_schema(kept),
            lambda text: parse_candidates(text, kept, effective.max_candidates),
        )
        key = plan_key(job.id, job.exchange)
        if not candidates:
            return Plan(key=key, model=model)
        scopes = [scope_of(c.category, job.workspace_id, exchange.user_id) for c in candidates]
        shown, handles = await self._neighbours(principal, job.workspace_id, candidates, scopes)
        choices: list[Choice]
        choices, _ = await self._structured(
            job,
            chain,
            _DECIDE,
            {
                "candidates": [
                    {
                        "candidate": index,
                        "category": CATEGORY_WORDS[candidate.category],
                        "content": candidate.content,
                        "existing": shown[index],
                    }
                    for index, candidate in enumerate(candidates)
                ]
            },
            DECISIONS,
            decisions_schema(),
            lambda text: parse_choices(text, [[s["handle"] for s in row] for row in shown]),
        )
        adding = {scope for scope, c in zip(scopes, choices, strict=True) if c.action == "add"}
        room = {
            scope: effective.max_items
            - await self._formed(principal, scope, job.workspace_id, effective.max_items)
            for scope in sorted(adding)
        }
        return decide(key, model, candidates, choices, handles, scopes, room)

    async def _neighbours(
        self,
        principal: Principal,
        workspace_id: str,
        candidates: Sequence[Candidate],
        scopes: Sequence[str],
    ) -> tuple[list[list[dict[str, str]]], list[dict[str, str]]]:
        """The memories shown with each candidate, and each candidate's handle -> name."""
        names: dict[str, str] = {}
        shown: list[list[dict[str, str]]] = []
        handles: list[dict[str, str]] = []
        for candidate, scope in zip(candidates, scopes, strict=True):
            found = await self._context.search_memory(
                principal,
                cpb.SearchMemoryItemsRequest(
                    parent=scope,
                    query=candidate.content,
                    page_size=self._similar,
                    workspace=_workspace_filter(scope, workspace_id),
                ),
                timeout_s=self._timeout_s,
            )
            row: list[dict[str, str]] = []
            mine: dict[str, str] = {}
            for result in found.results:
                item = result.memory_item
                if item.HasField("invalid_time"):
                    continue
                handle = names.setdefault(item.name, f"E{len(names) + 1}")
                mine[handle] = item.name
                valid = item.valid_time if item.HasField("valid_time") else item.create_time
                row.append(
                    {
                        "handle": handle,
                        "content": _clip(item.content),
                        "valid_from": valid.ToDatetime().isoformat() + "Z",
                    }
                )
            shown.append(row)
            handles.append(mine)
        return shown, handles

    async def _formed(self, principal: Principal, scope: str, workspace_id: str, limit: int) -> int:
        """How many current formed items ``scope`` holds (counted up to ``limit``)."""
        count, token = 0, ""
        while True:
            page = await self._context.list_memory(
                principal,
                cpb.ListMemoryItemsRequest(
                    parent=scope,
                    page_size=_PAGE,
                    page_token=token,
                    validity=cpb.MEMORY_VALIDITY_CURRENT,
                    workspace=_workspace_filter(scope, workspace_id),
                ),
                timeout_s=self._timeout_s,
            )
            count += sum(1 for item in page.memory_items if item.HasField("formation"))
            token = page.next_page_token
            if not token or count >= limit:
                return count


def _workspace_filter(scope: str, workspace_id: str) -> str:
    """In a user's scope, only what was formed in this workspace is this workspace's."""
    return f"workspaces/{workspace_id}" if scope.startswith("users/") else ""


__all__ = ["Former"]

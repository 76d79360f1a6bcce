"""Retrieval for the llm's runs: what the assistant asks of the window, and the
``search_memory`` tool.

An assistant with ``retrieval.enabled`` asks GetContextWindow for the top
matches of the incoming message (``retrieval_options``); the context service
ranks them, fits them in the budget and marks them RETRIEVED, and
``messages.build_messages`` gives them to the model with their sources. With
``retrieval.search_tool`` the model is offered ``search_memory`` (``SearchMemory``),
which the run's tool runner executes as a built-in: SearchContext in the run's
conversation, as the run's user, answered as a compact JSON list with sources.
"""

from __future__ import annotations

import json
from typing import Any, Final

from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.dispatcher.llm.conversation.messages import result_source
from switchboard.dispatcher.ports.context import ContextPort
from switchboard.platform.errors import InvalidArgument
from switchboard.platform.security.policy import Principal
from switchboard.platform.values import structs
from switchboard.platform.values.wording import noun

#: ``RetrievalSettings``' defaults for 0 (the contract's).
DEFAULT_TOP_K: Final = 5
DEFAULT_TOKEN_BUDGET: Final = 1_000
TOOL_NAME: Final = "search_memory"
MAX_QUERY_CHARS: Final = 2_000
MAX_FILTER_CHARS: Final = 1_000
MAX_LIMIT: Final = 10
DEFAULT_LIMIT: Final = 5
#: One result's text given to the model, at most (the runner cuts the whole too).
MAX_RESULT_TEXT: Final = 1_500
_MODES: Final = {
    "full_text": cpb.SEARCH_MODE_FULL_TEXT,
    "semantic": cpb.SEARCH_MODE_SEMANTIC,
    "hybrid": cpb.SEARCH_MODE_HYBRID,
}
_MODE_WORDS: Final = {value: word for word, value in _MODES.items()}
_FALLBACKS: Final = {
    cpb.SEARCH_FALLBACK_REASON_NOT_CONFIGURED: "not_configured",
    cpb.SEARCH_FALLBACK_REASON_NO_VECTOR_ENGINE: "no_vector_engine",
    cpb.SEARCH_FALLBACK_REASON_EMBEDDINGS_UNAVAILABLE: "embeddings_unavailable",
    cpb.SEARCH_FALLBACK_REASON_BUDGET_EXHAUSTED: "budget_exhausted",
}


def retrieval_options(settings: pb.RetrievalSettings, window_budget: int) -> cpb.RetrievalOptions:
    """The window's retrieval for an assistant's settings (0s are the defaults; the
    passages' budget never exceeds the window's)."""
    return cpb.RetrievalOptions(
        top_k=settings.top_k or DEFAULT_TOP_K,
        token_budget=min(settings.token_budget or DEFAULT_TOKEN_BUDGET, window_budget),
        mode=settings.mode,
        filter=settings.filter,
    )


def _schema() -> struct_pb2.Struct:
    schema = struct_pb2.Struct()
    schema.update(
        {
            "type": "object",
            "properties": {
                "query": {
                    "type": "string",
                    "maxLength": MAX_QUERY_CHARS,
                    "description": "What to look for, in words; meaning counts, not only "
                    "the exact words.",
                },
                "mode": {
                    "type": "string",
                    "enum": list(_MODES),
                    "description": "full_text (shared words), semantic (similar meaning) or "
                    "hybrid (both); the workspace's default if left out.",
                },
                "filter": {
                    "type": "string",
                    "maxLength": MAX_FILTER_CHARS,
                    "description": "Optional: comparisons joined by AND, on source "
                    "(memory, message, document), kind, role, conversation, file, "
                    'create_time or metadata.KEY; for example source = memory AND kind = "fact".',
                },
                "limit": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_LIMIT,
                    "description": f"Most results ({DEFAULT_LIMIT} if left out).",
                },
            },
            "required": ["query"],
            "additionalProperties": False,
        }
    )
    return schema


def search_memory_definition() -> hpb.ToolDefinition:
    """What the model is offered (a bare name: no integration provides it)."""
    definition = hpb.ToolDefinition(
        tool=TOOL_NAME,
        function_name=TOOL_NAME,
        description="Search this conversation's messages and memory and the workspace's "
        "memory and documents. Returns the best matches with where each came from.",
    )
    definition.input_schema.CopyFrom(_schema())
    return definition


def _arguments(arguments: dict[str, Any]) -> tuple[cpb.SearchContextRequest | None, str]:
    """The request for the model's arguments, or why they are not valid."""
    unknown = sorted(set(arguments) - {"query", "mode", "filter", "limit"})
    if unknown:
        return None, f"unknown {noun(len(unknown), 'argument')}: {', '.join(unknown)}"
    query = arguments.get("query")
    if not isinstance(query, str) or not query.strip():
        return None, "query is required: a non-empty string"
    if len(query) > MAX_QUERY_CHARS:
        return None, f"query is longer than {MAX_QUERY_CHARS:,} characters"
    request = cpb.SearchContextRequest(query=query, page_size=DEFAULT_LIMIT)
    mode = arguments.get("mode")
    if mode is not None:
        if mode not in _MODES:
            return None, f"mode must be one of {', '.join(_MODES)}"
        request.mode = _MODES[mode]
    filter_ = arguments.get("filter")
    if filter_ is not None:
        if not isinstance(filter_, str) or len(filter_) > MAX_FILTER_CHARS:
            return None, f"filter must be a string of at most {MAX_FILTER_CHARS:,} characters"
        request.filter = filter_
    limit = arguments.get("limit")
    if limit is not None:
        # JSON numbers arrive as floats: 3.0 is 3, 3.5 is not a count.
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int | float)
            or limit != int(limit)
            or not 1 <= limit <= MAX_LIMIT
        ):
            return None, f"limit must be an integer from 1 to {MAX_LIMIT}"
        request.page_size = int(limit)
    return request, ""


def _answer(response: cpb.SearchContextResponse) -> str:
    results: list[dict[str, Any]] = []
    for number, result in enumerate(response.results, 1):
        source, text = result_source(result)
        if len(text) > MAX_RESULT_TEXT:
            text = text[:MAX_RESULT_TEXT] + "…"
        results.append(
            {"n": number, "source": source, "score": round(result.score, 4), "text": text}
        )
    answer: dict[str, Any] = {"mode": _MODE_WORDS.get(response.mode, "full_text")}
    if response.fallback_reason:
        answer["fallback"] = _FALLBACKS.get(response.fallback_reason, "other")
    answer["results"] = results
    return json.dumps(answer, ensure_ascii=False)


class SearchMemory:
    """The ``search_memory`` built-in of one run (``tools.runner.BuiltinTool``)."""

    def __init__(self, context: ContextPort, conversation: str) -> None:
        self._context = context
        self._conversation = conversation
        self.definition = search_memory_definition()

    async def run(
        self,
        principal: Principal,
        arguments: struct_pb2.Struct,
        *,
        timeout_s: float,
        call_id: str = "",
    ) -> tuple[bool, str]:
        request, problem = _arguments(structs.message_dict(arguments))
        if request is None:
            return False, f"Invalid arguments: {problem}."
        request.parent = self._conversation
        try:
            response = await self._context.search(principal, request, timeout_s=timeout_s)
        except InvalidArgument as refused:
            # A filter the grammar refuses, a query over the server's limit: the
            # model may correct it.
            return False, f"The search was refused: {refused.message}"
        return True, _answer(response)

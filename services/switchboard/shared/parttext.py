"""How a message's parts read as text: the text a model reads, and is counted in.

Two services read parts (``ContentPart``) so: the context service counts a
message in it (``context/text/tokencount.py``) and fills a window's text and the
briefer summaries of pruned messages with it; the dispatcher's LLM handler
builds its prompt with it, so the model reads exactly the text its window was
counted in (docs/decisions.md, 47). Hence it lives below both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Final

from google.protobuf import struct_pb2

from switchboard.api.context.v1 import context_pb2
from switchboard.platform.values.structs import plain

#: Images vision models take; each costs a fixed number of tokens in a window
#: (``tokencount.message_tokens``) and goes to a vision model as an image.
VISION_IMAGE_TYPES: Final = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


def compact_json(value: struct_pb2.Struct) -> str:
    """A ``Struct`` as compact JSON with sorted keys.

    Compact and key-sorted so equal data always renders (and counts, and
    caches) the same; ensure_ascii=False because \\uXXXX escapes would cost
    several tokens per character.
    """
    data = {key: plain(item) for key, item in value.fields.items()}
    return json.dumps(data, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def render_file(reference: context_pb2.FileReference) -> str:
    """A file part as the model reads it: ``[file <display_name> <mime_type>]`` and,
    for a document or a transcribed recording, a newline and its text (as the
    context window filled it in); a part that names no stored file (stored
    before files were) is ``[file <mime_type> <uri>]``."""
    if not reference.file:
        return f"[file {reference.mime_type} {reference.uri}]"
    name = reference.display_name or reference.file.rsplit("/", 1)[-1]
    head = f"[file {name} {reference.mime_type}]"
    return f"{head}\n{reference.text}" if reference.text else head


def is_vision_image(reference: context_pb2.FileReference) -> bool:
    """A stored image of a type vision models take (OpenAI's list)."""
    return bool(reference.file) and reference.mime_type in VISION_IMAGE_TYPES


def _tool_call_head(call: context_pb2.ToolCallContent) -> str:
    return f"[tool call {call.function_name or call.tool}"


def _tool_result_head(result: context_pb2.ToolResultContent) -> str:
    # No double space when the result names no tool.
    tool = f" {result.tool}" if result.tool else ""
    return f"[tool result{tool}: {result.outcome}]"


def _render_part(part: context_pb2.ContentPart, *, brief: bool) -> str | None:
    kind = part.WhichOneof("part")
    if kind == "text":
        return part.text
    if kind == "data":
        return compact_json(part.data)
    if kind == "file":
        return render_file(part.file)
    if kind == "tool_call":
        if brief:
            return _tool_call_head(part.tool_call) + "]"
        return f"{_tool_call_head(part.tool_call)}({compact_json(part.tool_call.arguments)})]"
    if kind == "tool_result":
        head = _tool_result_head(part.tool_result)
        if brief or not part.tool_result.text:
            return head
        return f"{head}\n{part.tool_result.text}"
    return None


def render_parts(parts: Iterable[context_pb2.ContentPart]) -> str:
    """Render a message's content as the text a model sees, parts joined by newlines.

    Text parts are used as they are, ``data`` parts become compact JSON with
    sorted keys, and ``file`` parts become ``[file <display_name> <mime_type>]``
    followed by a newline and the file's text when the window filled it in
    (``render_file``; ``[file <mime_type> <uri>]`` for a part naming no stored
    file). A
    ``tool_call`` becomes ``[tool call <function_name>(<arguments as compact
    JSON>)]`` (the ``tool`` name when it has no function name), and a
    ``tool_result`` becomes ``[tool result <tool>: <outcome>]`` followed by a
    newline and its text, if any (``[tool result: <outcome>]`` when it names no
    tool). Ids are not rendered. Parts with nothing set carry no content and
    are left out.
    """
    rendered = (_render_part(part, brief=False) for part in parts)
    return "\n".join(text for text in rendered if text is not None)


def render_parts_briefly(parts: Iterable[context_pb2.ContentPart]) -> str:
    """``render_parts``, with tool calls and results cut down to what happened.

    A ``tool_call`` is ``[tool call <function_name>]`` (no arguments) and a
    ``tool_result`` only its ``[tool result <tool>: <outcome>]`` line. For
    summaries of pruned messages: a tool's arguments and output are bulky
    machine text that would crowd out what people said.
    """
    rendered = (_render_part(part, brief=True) for part in parts)
    return "\n".join(text for text in rendered if text is not None)

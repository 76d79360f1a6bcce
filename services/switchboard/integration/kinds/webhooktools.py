"""Webhook tools: a webhook integration that declares tools in its ``config``.

A webhook's ``config`` may hold ``tools``, a list of at most ``MAX_TOOLS``
objects::

    {"name": "create_ticket", "description": "...", "input_schema": {...}, "path": "tickets"}

``name`` is its own segment as ``ListTools`` writes it (1-128 ASCII letters,
digits, ``_``, ``.`` and ``-``), ``description`` at most ``MAX_DESCRIPTION``
characters, ``input_schema`` a JSON Schema object (compiled by ``platform/schemas.py``
when written, as ``tools.py`` does when it lists them), ``path`` optional: a
relative path appended to the endpoint. ``check_tools`` validates them on
CreateIntegration and UpdateIntegration; ``WebhookToolsConnector`` lists and
calls them.

**A call** is a ``POST`` to the endpoint (plus the tool's path) with the body
``{"tool": <name>, "arguments": {...}}``, signed as event deliveries are
(``webhooks.signed_headers``: the integration's secret, and the previous one
during a rotation), through the same client (``webhooks.webhook_client``: the
egress policy on every connection, redirects not followed). ``webhook-id`` is
the call's idempotency key when it has one, else a new id; the key is also
the ``Idempotency-Key`` header (``platform/values/idempotency.py``). The call's own
timeout (the integration's ``call_timeout``) bounds it, not the deliveries'.

**The answer**, classified as ``ports/connectors.py`` asks:

- 2xx: ``application/json`` ``{"text": str?, "result": object?, "is_error":
  bool?}`` (other keys ignored), ``text/plain`` as the text, or no body (an
  empty result). Anything else (another type, JSON of another shape, too
  deep, a compressed body) is ``Malformed``.
- 4xx (but 408 and 429): the tool's error result (``is_error``), its text
  ``HTTP <status>`` and the answer's text, if it gave one as above.
- 3xx (redirects are not followed), 408, 429, 5xx, anything else:
  ``Unreachable``; no answer in time: ``TimeoutError``.
- A body over ``raw_limit(max_result_bytes)``, or a result over
  ``max_result_bytes``: ``ResultTooLarge``, the rest unread.

The probe of a webhook stays its deliveries' (``connect/health.py``): ``probe`` asks
nothing. This module does not import grpc.
"""

from __future__ import annotations

import asyncio
import codecs
import datetime as dt
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import httpx
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from switchboard.integration.kinds.mcp import raw_limit
from switchboard.integration.ports.connectors import (
    Malformed,
    Progress,
    ToolNotFound,
    ToolResult,
    ToolSpec,
    Unreachable,
)
from switchboard.integration.webhooks.delivery import describe, signed_headers, webhook_client
from switchboard.platform.errors import (
    FailedPrecondition,
    ResolutionFailed,
    ResultTooLarge,
    Violations,
)
from switchboard.platform.schemas import compile_schema
from switchboard.platform.security.egress import EgressPolicy
from switchboard.platform.values import idempotency, jsonbounds, names, structs
from switchboard.platform.values.jsonbounds import JsonRejected

log = logging.getLogger("switchboard.integration.kinds.webhooktools")

#: Tools one webhook may declare.
MAX_TOOLS: Final = 50
MAX_DESCRIPTION: Final = 1000
MAX_PATH: Final = 256
#: The keys of a declared tool.
_KEYS: Final = frozenset({"name", "description", "input_schema", "path"})
#: A path segment's characters (RFC 3986 pchar, percent escapes checked apart).
_SEGMENT: Final = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=:@-]|%[0-9A-Fa-f]{2})+")
#: Requests to one webhook's tools kept alive at once (more wait for a connection).
IN_FLIGHT: Final = 16
#: Statuses that say the receiver cannot take the call now, not that the call was wrong.
_UNAVAILABLE_4XX: Final = frozenset({408, 429})


@dataclass(frozen=True)
class WebhookTool:
    """One declared tool: what ``ListTools`` shows, and the path its calls go to."""

    spec: ToolSpec
    path: str = ""


def _config(data: bytes | struct_pb2.Struct) -> dict[str, Any]:
    if isinstance(data, struct_pb2.Struct):
        struct = data
    else:
        struct = struct_pb2.Struct()
        try:
            struct.ParseFromString(data)
        except DecodeError:
            return {}
    value = structs.plain(struct_pb2.Value(struct_value=struct))
    return value if isinstance(value, dict) else {}


def declared(config: bytes) -> list[WebhookTool]:
    """The tools a stored webhook ``config`` declares (checked when it was written)."""
    entries = _config(config).get("tools")
    if not isinstance(entries, list):
        return []
    found: list[WebhookTool] = []
    for entry in entries[:MAX_TOOLS]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        schema = entry.get("input_schema")
        found.append(
            WebhookTool(
                ToolSpec(
                    name=entry["name"],
                    description=str(entry.get("description") or ""),
                    input_schema=schema if isinstance(schema, dict) else {"type": "object"},
                ),
                str(entry.get("path") or ""),
            )
        )
    return found


def declares_tools(config: bytes) -> bool:
    """Whether a stored webhook ``config`` declares any tool."""
    return bool(config) and bool(declared(config))


async def check_tools(config: struct_pb2.Struct, field: str, violations: Violations) -> None:
    """Add a violation for each way a webhook ``config``'s ``tools`` is wrong."""
    if "tools" not in config.fields:
        return
    where = f"{field}.tools"
    entries = _config(config).get("tools")
    if not isinstance(entries, list):
        violations.add(where, "must be a list of tools")
        return
    if len(entries) > MAX_TOOLS:
        violations.add(where, f"may declare at most {MAX_TOOLS} tools")
        return
    seen: set[str] = set()
    schemas: dict[str, dict[str, Any]] = {}
    for index, entry in enumerate(entries):
        at = f"{where}[{index}]"
        if not isinstance(entry, dict):
            violations.add(at, "must be an object with name, description, input_schema and path")
            continue
        _check_tool(entry, at, seen, violations)
        schema = entry.get("input_schema")
        problem = _schema_problem(schema)
        if problem:
            violations.add(f"{at}.input_schema", problem)
        elif isinstance(schema, dict):
            schemas[f"{at}.input_schema"] = schema
    # The schema is the owner's to run: compiled as every other is, off the loop.
    compiled = await asyncio.to_thread(
        lambda: {at: compile_schema(schema) for at, schema in schemas.items()}
    )
    for at, checker in compiled.items():
        if checker.problem:
            violations.add(at, checker.problem.removeprefix("it ").removeprefix("its "))


def _check_tool(entry: dict[str, Any], at: str, seen: set[str], violations: Violations) -> None:
    """A declared tool's keys, name, description and path (its schema apart)."""
    for key in sorted(entry.keys() - _KEYS):
        violations.add(
            f"{at}.{key[:60]}", "is not a tool's field (name, description, input_schema, path)"
        )
    name = entry.get("name")
    if not isinstance(name, str) or names.tool_segment(name) != name:
        violations.add(
            f"{at}.name",
            "must be 1-128 ASCII letters, digits, '_', '.' or '-' (a tool's segment as "
            "ListTools writes it)",
        )
    elif name in seen:
        violations.add(f"{at}.name", "names a tool declared before it")
    else:
        seen.add(name)
    description = entry.get("description", "")
    if not isinstance(description, str):
        violations.add(f"{at}.description", "must be text")
    elif len(description) > MAX_DESCRIPTION:
        violations.add(f"{at}.description", f"is longer than {MAX_DESCRIPTION} characters")
    if "path" in entry:
        problem = _path_problem(entry["path"])
        if problem:
            violations.add(f"{at}.path", problem)


def _schema_problem(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "is required: a JSON Schema object"
    if schema.get("type", "object") != "object":
        return 'must describe an object ("type": "object"): the arguments are one'
    try:
        jsonbounds.check_value(schema)
    except JsonRejected as rejected:
        return f"is {rejected}"
    return ""


def _path_problem(path: Any) -> str:
    if not isinstance(path, str) or not path:
        return "must be a relative path, e.g. tickets/create"
    if len(path) > MAX_PATH:
        return f"is longer than {MAX_PATH} characters"
    segments = path.split("/")
    if path.startswith("/") or any(
        not _SEGMENT.fullmatch(part) or part in (".", "..") for part in segments
    ):
        return (
            "must be a relative path of segments joined by '/': letters, digits, "
            "-._~!$&'()*+,;=:@ and %XX escapes; no empty, '.' or '..' segment, "
            "no query or fragment"
        )
    return ""


def tool_url(endpoint: str, path: str) -> str:
    """The endpoint with ``path`` appended to its path (its query, if any, kept)."""
    if not path:
        return endpoint
    url = httpx.URL(endpoint)
    return str(url.copy_with(raw_path=_joined(url, path)))


def _joined(url: httpx.URL, path: str) -> bytes:
    base = url.raw_path.partition(b"?")
    joined = base[0].rstrip(b"/") + b"/" + path.encode("ascii")
    return joined + (b"?" + base[2] if base[1] else b"")


#: The signing secrets of a call made now: the current one, and the previous during a rotation.
Secrets = Callable[[], list[str]]


def signing_secrets(
    current: str | None,
    previous: Callable[[], str] | None,
    previous_until: dt.datetime | None,
) -> Secrets:
    """The secrets a webhook's calls are signed with, as its deliveries'
    (``WebhookEngine._signing_secrets``): the previous one only until ``previous_until``."""

    def secrets() -> list[str]:
        found = [current] if current else []
        if found and previous is not None and previous_until and previous_until > names.now():
            try:
                found.append(previous())
            except Exception:  # noqa: BLE001 - a sealed secret this server cannot open
                log.warning("a webhook's previous signing secret cannot be opened")
        return found

    return secrets


class WebhookToolsConnector:
    """The hub's client of one webhook's declared tools (``connectors.Connector``)."""

    def __init__(
        self,
        endpoint: str,
        tools: Sequence[WebhookTool],
        *,
        secrets: Secrets,
        egress: EgressPolicy,
        connect_timeout_s: float,
    ) -> None:
        self._endpoint = endpoint
        self._tools = {tool.spec.name: tool for tool in tools}
        self._secrets = secrets
        self._client = webhook_client(egress, timeout_s=connect_timeout_s, in_flight=IN_FLIGHT)

    async def probe(self, timeout_s: float) -> None:
        """Nothing is asked: a webhook's health is its deliveries' (``connect/health.py``)."""
        return None

    async def list_tools(self, timeout_s: float) -> list[ToolSpec]:
        return [tool.spec for tool in self._tools.values()]

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any],
        *,
        timeout_s: float,
        max_result_bytes: int,
        progress: Progress | None = None,
        idempotency_key: str = "",
    ) -> ToolResult:
        tool = self._tools.get(name)
        if tool is None:
            raise ToolNotFound(name)
        secrets = self._secrets()
        if not secrets:
            raise FailedPrecondition("the webhook has no signing secret; set its credential")
        body = json.dumps(
            {"tool": name, "arguments": dict(arguments)}, separators=(",", ":"), ensure_ascii=False
        )
        headers = {
            **signed_headers(secrets, idempotency_key or f"msg_{names.new_id()}", body),
            # Measured as it arrives: a compressed body could not be.
            "accept-encoding": "identity",
        }
        if idempotency_key:
            headers[idempotency.HEADER] = idempotency_key
        limit = raw_limit(max_result_bytes)
        url = tool_url(self._endpoint, tool.path)
        status, data, kind = await self._post(url, body.encode(), headers, timeout_s, limit)
        if status < 400:
            result = _result(data, kind, limit)
        else:
            # The call was refused, and that is the answer: what it says is a
            # courtesy, and one in no known shape is left out, not held against it.
            try:
                said = _result(data, kind, limit)
            except Malformed:
                said = ToolResult()
            text = f"HTTP {status}" + (f": {said.text}" if said.text else "")
            result = ToolResult(structured=said.structured, text=text, is_error=True)
        size = len(result.text.encode())
        if result.structured is not None:
            size += len(json.dumps(result.structured, separators=(",", ":")).encode())
        if size > max_result_bytes:
            raise ResultTooLarge(f"the tool's result is larger than {max_result_bytes} bytes")
        return result

    async def _post(
        self, url: str, body: bytes, headers: dict[str, str], timeout_s: float, limit: int
    ) -> tuple[int, bytes, str]:
        """The status, body and content type of an answer that is one (2xx, 4xx)."""
        try:
            async with self._client.stream(
                "POST", url, content=body, headers=headers, timeout=httpx.Timeout(timeout_s)
            ) as response:
                status = response.status_code
                if not 200 <= status < 500 or 300 <= status < 400 or status in _UNAVAILABLE_4XX:
                    why = "; redirects are not followed" if 300 <= status < 400 else ""
                    raise Unreachable(f"it answered HTTP {status}{why}")
                encoding = response.headers.get("content-encoding", "identity")
                if encoding.strip().lower() not in ("", "identity"):
                    raise Malformed("its answer is compressed, which cannot be measured")
                data = await _read(response, limit)
                return status, data, response.headers.get("content-type", "")
        except httpx.TimeoutException:
            raise TimeoutError from None
        except ResolutionFailed:
            raise Unreachable("its host name could not be resolved") from None
        except httpx.HTTPError as exc:
            raise Unreachable(describe(exc, timeout_s)) from None

    async def close(self) -> None:
        await self._client.aclose()


async def _read(response: httpx.Response, limit: int) -> bytes:
    """The body, or ResultTooLarge once it carries more than ``limit`` bytes."""
    data = bytearray()
    async for chunk in response.aiter_raw():
        data += chunk
        if len(data) > limit:
            raise ResultTooLarge(f"the tool's answer is larger than {limit} bytes")
    return bytes(data)


def _result(data: bytes, content_type: str, limit: int) -> ToolResult:
    """A 2xx (or 4xx) body as a result; Malformed when it is none of the shapes."""
    if not data:
        return ToolResult()
    media, _, parameters = content_type.partition(";")
    media = media.strip().lower()
    if media == "application/json" or media.endswith("+json"):
        try:
            answer = jsonbounds.loads(data, max_bytes=limit)
        except JsonRejected as rejected:
            raise Malformed(f"its answer is {rejected}") from None
        if not isinstance(answer, dict):
            raise Malformed("its answer is not a JSON object")
        text, result, is_error = answer.get("text"), answer.get("result"), answer.get("is_error")
        if (
            not isinstance(text, str | None)
            or not isinstance(result, dict | None)
            or not isinstance(is_error, bool | None)
        ):
            raise Malformed(
                'its answer is not {"text": string, "result": object, "is_error": boolean}'
            )
        return ToolResult(structured=result, text=text or "", is_error=bool(is_error))
    if media == "text/plain":
        return ToolResult(text=data.decode(_charset(parameters), errors="replace"))
    raise Malformed("its answer is neither application/json nor text/plain")


def _charset(parameters: str) -> str:
    for parameter in parameters.split(";"):
        key, _, value = parameter.partition("=")
        if key.strip().lower() == "charset":
            name = value.strip().strip('"')
            try:
                return codecs.lookup(name).name if name else "utf-8"
            except LookupError:
                return "utf-8"
    return "utf-8"

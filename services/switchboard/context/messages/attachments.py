"""Files in messages: every file part resolved to a stored file before the message is.

A message part (``ContentPart.file``), and each file of a tool result
(``ToolResultContent.files``), names its content in one of three ways; on
append each becomes a stored file of the message's workspace:

- ``file``: a stored file of the same workspace (``files.resolve``); another
  workspace's, or a deleted one, is NOT_FOUND naming the part;
- ``inline_data``: bytes stored as a new file (``files.store_bytes``, with
  every check of an upload), at most ``max_inline_bytes``
  (RESOURCE_EXHAUSTED); without a ``mime_type``, as the type the content shows
  (sniffed, as an upload declared ``application/octet-stream``);
- ``uri``: an http(s) URL fetched through the egress policy
  (``files/fetch.py``) within the same limit, and stored with it as its
  ``source_uri``; a URL that cannot be fetched is INVALID_ARGUMENT naming the
  part and why (the caller's resource, not our outage).

The stored part names the file: ``file``, ``mime_type``, ``size_bytes`` and
``display_name`` come from the stored ``File``, ``inline_data`` is cleared and
``uri`` is kept as where the content came from. Parts are resolved in order;
if one fails, the files stored for the earlier ones are deleted again and
nothing is stored.

A message's token count includes its files' text (a document's extracted
text, a recording's transcript: ``files.texts``) and a fixed cost per image
(``Limits.image_tokens``), so a window counts what the handler will read.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from switchboard.api.context.v1 import context_pb2 as pb
from switchboard.context.files.fetch import UrlFetcher
from switchboard.context.files.reading.sniff import GENERIC
from switchboard.platform.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    RequestTooLarge,
    SwitchboardError,
    Violations,
)
from switchboard.platform.security.policy import Principal
from switchboard.platform.values.resources import FileName, WorkspaceName

log = logging.getLogger("switchboard.context.files")

#: Longest display name a part may give.
MAX_DISPLAY_NAME_CHARS = 255
#: What a fetched or inline file is called when neither the part nor the URL names it.
DEFAULT_NAME = "attachment"


class FileStore(Protocol):
    """What attaching needs of the files domain (``ContextDomain.files``)."""

    async def store_bytes(
        self,
        creator: str,
        workspace: str,
        *,
        display_name: str,
        media_type: str,
        data: bytes,
        source_uri: str = "",
    ) -> pb.File: ...

    async def resolve(self, workspace: str, name: str) -> pb.File: ...

    async def texts(self, names: Iterable[str]) -> dict[str, tuple[str, int]]: ...

    def delete(self, principal: Principal, /, name: str) -> Awaitable[None]: ...


def file_parts(
    parts: Sequence[pb.ContentPart], prefix: str = "message.parts"
) -> Iterator[tuple[str, pb.FileReference]]:
    """Every file reference of ``parts`` with its field path: file parts, and the
    files of tool results."""
    for index, part in enumerate(parts):
        kind = part.WhichOneof("part")
        if kind == "file":
            yield f"{prefix}[{index}].file", part.file
        elif kind == "tool_result":
            for number, reference in enumerate(part.tool_result.files):
                yield f"{prefix}[{index}].tool_result.files[{number}]", reference


def check_references(parts: Sequence[pb.ContentPart], violations: Violations) -> None:
    """Field checks of every file reference: exactly one source, a well-formed name."""
    for where, reference in file_parts(parts):
        # A stored file's part may carry the URL it came from (a message read
        # back and sent again); bytes beside a name would be ambiguous.
        if reference.file:
            if reference.inline_data:
                violations.add(where, "needs exactly one of file, uri or inline_data")
                continue
        elif bool(reference.uri) == bool(reference.inline_data):
            violations.add(where, "needs exactly one of file, uri or inline_data")
            continue
        if len(reference.display_name) > MAX_DISPLAY_NAME_CHARS:
            violations.add(
                f"{where}.display_name", f"is longer than {MAX_DISPLAY_NAME_CHARS} characters"
            )
        if reference.text:
            violations.add(f"{where}.text", "is output only")
        if reference.file and FileName.parse_or_none(reference.file) is None:
            violations.add(f"{where}.file", "must be a file name, workspaces/{w}/files/{f}")


def check_inline_sizes(parts: Sequence[pb.ContentPart], max_inline_bytes: int) -> None:
    for where, reference in file_parts(parts):
        if len(reference.inline_data) > max_inline_bytes:
            raise RequestTooLarge(
                f"{where}.inline_data is {len(reference.inline_data)} bytes; the limit is "
                f"{max_inline_bytes}"
            )


@dataclass
class Attached:
    """What resolving a message's files did: the files it stored (to delete
    again if the append fails) and every file it names."""

    stored: list[str] = field(default_factory=list)
    named: list[str] = field(default_factory=list)
    #: Who appended (the files it stored are deleted in that name).
    principal: Principal | None = None


def _part_field(where: str, field: str) -> str:
    """A field of the stored file (``file.media_type``) as the part's (``...mime_type``)."""
    name = field.rsplit(".", 1)[-1]
    return f"{where}.{_PART_FIELDS.get(name, name)}"


_PART_FIELDS = {"media_type": "mime_type", "data": "inline_data"}


class Attachments:
    """Resolves the file references of appended messages (``Messages.append``)."""

    def __init__(self, files: FileStore, fetcher: UrlFetcher, *, max_inline_bytes: int) -> None:
        self.files = files
        self._fetcher = fetcher
        self.max_inline_bytes = max_inline_bytes

    async def close(self) -> None:
        await self._fetcher.close()

    async def attach(
        self,
        principal: Principal,
        creator: str,
        workspace_id: str,
        parts: Sequence[pb.ContentPart],
    ) -> Attached:
        """Resolve every file reference of ``parts`` in place; on failure the files
        stored so far are deleted again and the error names the part."""
        attached = Attached(principal=principal)
        try:
            for where, reference in file_parts(parts):
                new = not reference.file
                stored = await self._one(creator, workspace_id, where, reference)
                if new:
                    attached.stored.append(stored.name)
                reference.file = stored.name
                reference.mime_type = stored.media_type
                reference.size_bytes = stored.size_bytes
                reference.display_name = stored.display_name
                reference.ClearField("inline_data")
                attached.named.append(stored.name)
        except BaseException:
            await self.discard(attached)
            raise
        return attached

    async def discard(self, attached: Attached) -> None:
        """Delete the files an append stored; best effort (an orphan is collected later)."""
        principal = attached.principal
        if principal is None:
            return
        for name in attached.stored:
            try:
                await self.files.delete(principal, name)
            except SwitchboardError as exc:
                log.warning(
                    "a file stored for a failed append was left behind",
                    extra={"file": name, "error": type(exc).__name__},
                )
        attached.stored.clear()

    async def _one(
        self, creator: str, workspace_id: str, where: str, reference: pb.FileReference
    ) -> pb.File:
        workspace = str(WorkspaceName(workspace_id))
        if reference.file:
            try:
                return await self.files.resolve(workspace, reference.file)
            except NotFound:
                raise NotFound(f"{where}.file: {reference.file} not found") from None
        if reference.inline_data:
            data = reference.inline_data
            display_name = reference.display_name or DEFAULT_NAME
            # Without a type, the content's own (sniffed), as for a generic upload.
            media_type = reference.mime_type or GENERIC
        else:
            fetched = await self._fetcher.fetch(
                reference.uri, f"{where}.uri", limit=self.max_inline_bytes
            )
            data = fetched.data
            display_name = reference.display_name or fetched.display_name or DEFAULT_NAME
            media_type = reference.mime_type or fetched.media_type or GENERIC
        try:
            stored = await self.files.store_bytes(
                creator,
                workspace,
                display_name=display_name,
                media_type=media_type,
                data=data,
                source_uri=reference.uri,
            )
        except InvalidArgument as exc:
            # The store names its own fields (file.media_type...); the client named a part.
            raise type(exc)(
                f"{where}: {exc.message}",
                [
                    FieldViolation(_part_field(where, v.field), v.description)
                    for v in exc.violations
                ],
                metadata=exc.metadata,
            ) from None
        except RequestTooLarge as exc:
            raise RequestTooLarge(f"{where}: {exc.message}", metadata=exc.metadata) from None
        return stored

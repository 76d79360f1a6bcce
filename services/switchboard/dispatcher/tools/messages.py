"""A run's tool steps stored as messages of its conversation.

Each step becomes an ASSISTANT message (its text and calls) and one TOOL
message per result, written in the background in order (the next model request
does not wait for them) and awaited before the final answer is stored, so the
next run's context window holds them. Each is stored under a request id of its
step and position, so a step a crash left unstored is stored again without
being stored twice (``restore``).

Files a tool returned are stored with its TOOL message
(``ToolResultContent.files``; the context service stores inline bytes as the
workspace's files on append), and the job keeps them as the stored message names
them. A file the context service refuses (its type or size) does not lose the
result: the message is stored again without it, with a note.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Final, Protocol

from google.rpc import code_pb2

from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.handler.v1 import handler_pb2 as hpb
from switchboard.dispatcher.tools.journal import Journal
from switchboard.dispatcher.tools.results import (
    MAX_ARGUMENT_BYTES,
    MAX_ERROR_CHARS,
    UNSAFE,
    tool_name,
    without_bytes,
)
from switchboard.platform.errors import SwitchboardError
from switchboard.platform.values.resources import RunName

log = logging.getLogger("switchboard.dispatcher.tools")

#: Outcome names stored in ToolResultContent (the context service checks them).
OUTCOMES: Final = {
    hpb.TOOL_OUTCOME_SUCCEEDED: "succeeded",
    hpb.TOOL_OUTCOME_ERROR: "error",
    hpb.TOOL_OUTCOME_FAILED: "failed",
    hpb.TOOL_OUTCOME_DENIED: "denied",
}
#: What the context service answers for a file it will not store (a lying media
#: type, too large, over the quota, a URL it may not fetch): the message is stored
#: without the files rather than lost.
_FILE_REFUSALS: Final = frozenset(
    {code_pb2.INVALID_ARGUMENT, code_pb2.RESOURCE_EXHAUSTED, code_pb2.FAILED_PRECONDITION}
)


class MessageHost(Protocol):
    """What the step messages need of the dispatcher for one run."""

    def append(self, request: cpb.AppendMessageRequest) -> Awaitable[cpb.Message]:
        """Store a message in the run's conversation as the run's user."""
        ...


class StepMessages:
    """The messages of one run's tool steps."""

    def __init__(self, host: MessageHost, run: pb.Run, journal: Journal) -> None:
        self._host = host
        self._run = run
        self._journal = journal
        #: The run's name read once (a name it was given by its own dispatcher).
        self._run_name = RunName.parse(run.name, "run")
        self._writes: asyncio.Future[None] | None = None

    def restore(self, steps: Sequence[hpb.ToolStep]) -> None:
        """Store the messages of journaled steps a crash left unstored (their
        request ids are the first attempt's: what was stored is not stored twice)."""
        for index, step in enumerate(steps):
            complete = len(step.results) == len(step.calls)
            if complete and not self._journal.record(index).stored:
                self.store(index, step)

    def store(self, index: int, step: hpb.ToolStep) -> None:
        """Store the step's messages, then the job, after the steps before (in the background)."""
        previous = self._writes
        self._writes = asyncio.ensure_future(self._write(previous, index, step))

    async def drain(self) -> None:
        """Wait for the steps' messages to be stored (before the final answer is)."""
        if self._writes is not None:
            await self._writes

    async def _write(
        self, previous: asyncio.Future[None] | None, index: int, step: hpb.ToolStep
    ) -> None:
        if previous is not None:
            await previous
        try:
            await self._host.append(self._call_message(index, step))
            for position, result in enumerate(step.results):
                stored = await self._store_result(index, position, result)
                # The job keeps what the message names (stored files), not the bytes.
                _named(result.files, stored)
            # Rides on the journal's next write (the next step's, or the answer's): a
            # crash before that stores these messages again, under the same request ids.
            self._journal.record(index).stored = True
        except SwitchboardError as exc:
            # The run goes on; its messages are incomplete, which the final
            # answer's own store (the same database) will report if it persists.
            log.warning("tool step not stored", extra={"run": self._run.name, "reason": exc.reason})
        except Exception:
            # Not awaited if the run ends first (only drain() awaits the chain):
            # logged here, never left unread in the future, and the chain goes on.
            log.exception("tool step not stored", extra={"run": self._run.name})

    def _call_message(self, index: int, step: hpb.ToolStep) -> cpb.AppendMessageRequest:
        parts: list[cpb.ContentPart] = []
        if step.text:
            parts.append(cpb.ContentPart(text=step.text))
        for call in step.calls:
            content = cpb.ToolCallContent(
                id=call.id,
                tool=tool_name(call),
                # Stored calls are named like the model names them (the context
                # service requires a name when the tool is unknown).
                function_name=(call.function_name or UNSAFE.sub("_", call.tool))[:64] or "unknown",
            )
            if call.arguments.ByteSize() <= MAX_ARGUMENT_BYTES:
                content.arguments.CopyFrom(call.arguments)
            parts.append(cpb.ContentPart(tool_call=content))
        return self._append_request(cpb.MESSAGE_ROLE_ASSISTANT, parts, f"s{index}-calls")

    async def _store_result(
        self, index: int, position: int, result: hpb.ToolResult
    ) -> cpb.Message | None:
        """Store the TOOL message of ``result``; with its files refused, once more
        without them (the result's text says which were left out, and why)."""
        request = self._result_message(index, position, result)
        if not result.files:
            await self._host.append(request)
            return None
        try:
            return await self._host.append(request)
        except SwitchboardError as exc:
            if exc.code not in _FILE_REFUSALS:
                raise
            log.warning(
                "a tool's files were not stored",
                extra={"run": self._run.name, "reason": exc.reason},
            )
            content = request.message.parts[0].tool_result
            names_ = ", ".join(f.display_name or f.mime_type or "file" for f in content.files)
            note = f"[files not stored ({names_}): {exc.message[:MAX_ERROR_CHARS]}]"
            content.text = f"{content.text}\n{note}" if content.text else note
            del content.files[:]
            request.request_id = request.request_id[:60] + "-nf"
            await self._host.append(request)
            return None

    def _result_message(
        self, index: int, position: int, result: hpb.ToolResult
    ) -> cpb.AppendMessageRequest:
        content = cpb.ToolResultContent(
            id=result.id,
            # A built-in's bare name is no tool resource: stored by its call's id only.
            tool=result.tool if "/" in result.tool else "",
            outcome=OUTCOMES.get(result.outcome, "failed"),
            text=result.text,
            files=result.files,
        )
        return self._append_request(
            cpb.MESSAGE_ROLE_TOOL, [cpb.ContentPart(tool_result=content)], f"s{index}-r{position}"
        )

    def _append_request(
        self, role: cpb.MessageRole.ValueType, parts: list[cpb.ContentPart], suffix: str
    ) -> cpb.AppendMessageRequest:
        return cpb.AppendMessageRequest(
            parent=str(self._run_name.parent),
            message=cpb.Message(
                role=role, author=self._run.handler, parts=parts, run=self._run.name
            ),
            request_id=f"run-{self._run_name.run}-{suffix}"[:64],
            branch=self._run.branch,
        )


def _named(files: Sequence[cpb.FileReference], stored: cpb.Message | None) -> None:
    """``files`` as the stored message names them (``file`` set by the context
    service), else without their bytes."""
    kept = stored.parts[0].tool_result.files if stored is not None and stored.parts else []
    if len(kept) == len(files):
        for found, named in zip(files, kept, strict=True):
            found.CopyFrom(named)
    without_bytes(files)

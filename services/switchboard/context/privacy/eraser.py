"""The context service's part of an erasure (docs/privacy.md, ``platform/events/erasure``).

For a deleted account, in every workspace it was a member of: the messages it wrote
and the answers of the runs it started are deleted as DeleteMessage deletes them (their
files, citations, embeddings; a MESSAGE_DELETED tombstone each), the windows cached for
those conversations forgotten; everywhere: the memory about the person (their own, and
the items they created), the files they uploaded and their unfinished uploads, with
their bytes once no other file names them, and their passages in the semantic index.
The workspaces the person chose to delete go whole, at once. Every step is idempotent:
a part cut short is done again from the start.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from switchboard.api.auth.v1 import auth_pb2
from switchboard.context.files.catalog import Files
from switchboard.context.messages.catalog import Messages
from switchboard.context.privacy.exports import DataExports
from switchboard.context.privacy.store import PrivacyStore
from switchboard.context.semantic.indexing.chunkstore import ChunkStore
from switchboard.context.windows.cache import WindowCache
from switchboard.platform.cache import hash_tag
from switchboard.platform.events.erasure.store import ErasureRecord, ErasureStore
from switchboard.platform.values.resources import FileName, MessageName, UserName, WorkspaceName

log = logging.getLogger(__name__)


class ContextEraser:
    def __init__(
        self,
        store: PrivacyStore,
        erasures: ErasureStore,
        messages: Messages,
        files: Files,
        exports: DataExports,
        chunks: ChunkStore | None,
        windows: WindowCache | None,
    ) -> None:
        self._store = store
        self._erasures = erasures
        self._messages = messages
        self._files = files
        self._exports = exports
        self._chunks = chunks
        self._windows = windows

    async def __call__(self, erasure: ErasureRecord) -> bool:
        if not erasure.user_id:
            # A deleted message's redaction: the rows are gone already; the windows
            # cached before (out of reach, not yet expired) and SQLite's full-text
            # index (until its segments merge) still hold their words.
            names = await self._erasures.names(erasure.id)
            parsed = [MessageName.parse_or_none(name) for name in names]
            await self._forget_windows({m.conversation for m in parsed if m is not None})
            await self._store.compact_words()
            return True
        user_name = str(UserName(erasure.user_id))
        plan = auth_pb2.DeleteMyAccountRequest.FromString(erasure.plan)
        deleting = {
            WorkspaceName.parse(entry.workspace, "workspace").workspace
            for entry in plan.workspaces
            if entry.action == auth_pb2.OWNED_WORKSPACE_ACTION_DELETE
        }
        for workspace_id in sorted(deleting):
            await self._delete_workspace(workspace_id)
        # A member's words in one workspace (RemoveWorkspaceMember with ``erase``), or
        # (no workspaces) a deleted account's everywhere.
        within = erasure.workspaces
        files = await self._words(erasure, user_name)
        await self._memory(erasure, user_name)
        files += await self._store.files_of(user_name, within)
        await self._remove_files(erasure, files)
        for upload in await self._store.remove_uploads(user_name, within):
            await self._files.blobs.discard(upload)
        if not within:
            await self._exports.remove_of(erasure.user_id)
            if self._chunks is not None:
                await self._chunks.delete_owner(user_name)
        await self._store.compact_words()
        # A run still working when the account went may store its answer after the
        # pass above (in one process it appends without a credential check): the part
        # is done once none of the person's runs works, and done again until then.
        return not await self._store.working_runs(user_name, within)

    async def _delete_workspace(self, workspace_id: str) -> None:
        ids = await self._store.workspace_files(workspace_id)
        conversations = await self._store.conversations_in(workspace_id)
        if self._chunks is not None:
            await self._chunks.delete_owner(str(WorkspaceName(workspace_id)))
        await self._store.delete_workspace(workspace_id)
        await self._collect(await self._store.remove_files(ids))
        await self._forget_windows(conversations)

    async def _words(self, erasure: ErasureRecord, user_name: str) -> list[tuple[str, str]]:
        """Erase the person's messages everywhere; the files they owned."""
        while await self._store.fill_authors():
            pass  # messages from before the author column: filled once, then found by it
        doomed = [
            message
            for message in await self._store.messages_of(user_name)
            if not erasure.workspaces or message.workspace_id in erasure.workspaces
        ]
        owned: list[tuple[str, str]] = []
        purged: list[str] = []
        names: list[str] = []
        for message in doomed:
            name = str(MessageName(message.workspace_id, message.conversation_id, message.id))
            names.append(name)
            if message.conversation_deleted:
                purged.append(message.id)
            else:
                files = await self._messages.erase(
                    message.workspace_id, message.conversation_id, message.id
                )
                owned += [(message.workspace_id, file) for file in files or []]
            if self._chunks is not None:
                await self._chunks.delete_source("message", name)
        await self._store.purge_messages(purged)
        await self._erasures.remember(erasure.id, names)
        await self._forget_windows({m.conversation_id for m in doomed})
        return owned

    async def _memory(self, erasure: ErasureRecord, user_name: str) -> None:
        items = await self._store.memory_of(erasure.user_id, user_name, erasure.workspaces)
        names = [f"{scope}/memories/{item}" for scope, item in items]
        if self._chunks is not None:
            for name in names:
                await self._chunks.delete_source("memory", name)
        await self._store.delete_memory([item for _, item in items])
        await self._erasures.remember(erasure.id, names)

    async def _remove_files(self, erasure: ErasureRecord, files: Sequence[tuple[str, str]]) -> None:
        names = [str(FileName(workspace, file)) for workspace, file in files]
        if self._chunks is not None:
            for name in names:
                await self._chunks.delete_source("document", name)
        await self._collect(await self._store.remove_files([file for _, file in files]))
        await self._erasures.remember(erasure.id, names)

    async def _collect(self, hashes: Sequence[str]) -> None:
        """Delete the bytes no other file names (a blob is shared by equal contents)."""
        kept = await self._store.named_hashes(hashes)
        for sha256 in sorted(set(hashes) - kept):
            await self._files.blobs.delete(sha256)

    async def _forget_windows(self, conversations: Sequence[str] | set[str]) -> None:
        if self._windows is None:
            return
        for conversation in conversations:
            await self._windows.forget(hash_tag(conversation))

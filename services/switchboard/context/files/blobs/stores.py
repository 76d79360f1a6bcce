"""Which blob store a process opens: the directory beside the database by default, or
the S3-compatible object store that every replica of a scaled-out deployment shares."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from switchboard.context.files.blobs.directory import DirectoryBlobStore
from switchboard.context.files.blobs.port import BlobStore
from switchboard.context.files.settings import FileSettings
from switchboard.platform.config import SQLITE_DRIVER
from switchboard.platform.store.db import is_sqlite_memory, parse_database_url

log = logging.getLogger("switchboard.context.files")


def files_directory(settings: FileSettings, *, database_url: str, dev_mode: bool) -> Path | None:
    """The directory store's root: ``context_files_dir``, else ``files`` beside the
    SQLite database file; with another database, None in dev mode (a temporary
    directory) and otherwise ``files`` in the working directory, said once at start:
    a deployment that upgrades keeps starting, and its operator learns that replicas
    on several machines need a shared directory or the S3 store."""
    if settings.context_files_dir:
        return Path(settings.context_files_dir)
    parsed = parse_database_url(database_url)
    if parsed.drivername == SQLITE_DRIVER and not is_sqlite_memory(parsed):
        return Path(parsed.database or "").resolve().parent / "files"
    if dev_mode:
        return None
    directory = Path("files").resolve()
    log.warning(
        "files are kept in %s on this machine: replicas on several machines need "
        "SWITCHBOARD_CONTEXT_FILES_DIR on a shared volume or SWITCHBOARD_CONTEXT_BLOB_STORE=s3",
        directory,
    )
    return directory


def temporary_store() -> DirectoryBlobStore:
    """A directory store of this process only, removed when it closes (dev mode, tests)."""
    directory = Path(tempfile.mkdtemp(prefix="switchboard-files-"))
    log.warning("files are kept in a temporary directory, %s, until the process ends", directory)
    return DirectoryBlobStore(directory, ephemeral=True)


def open_blob_store(settings: FileSettings, *, database_url: str, dev_mode: bool) -> BlobStore:
    """The configured blob store (``context_blob_store``)."""
    if settings.context_blob_store == "s3":
        # Only here: boto3 and botocore take about a second to import, which a process
        # on the directory store (the default) would pay at every start for nothing.
        from switchboard.context.files.blobs.s3 import S3BlobStore

        return S3BlobStore.from_settings(settings, dev_mode=dev_mode)
    directory = files_directory(settings, database_url=database_url, dev_mode=dev_mode)
    return temporary_store() if directory is None else DirectoryBlobStore(directory)

"""Which blob store a process opens: the directory beside the database by default."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from switchboard.context.files.blobs import BlobStore
from switchboard.context.files.dirblobs import DirectoryBlobStore
from switchboard.context.settings import ContextSettings
from switchboard.platform.config import SQLITE_DRIVER, ConfigError
from switchboard.platform.store.db import is_sqlite_memory, parse_database_url

log = logging.getLogger("switchboard.context.files")


def files_directory(settings: ContextSettings, *, database_url: str, dev_mode: bool) -> Path | None:
    """The directory store's root: ``context_files_dir``, else ``files`` beside the
    SQLite database file, else (dev mode only) None: a temporary directory."""
    if settings.context_files_dir:
        return Path(settings.context_files_dir)
    parsed = parse_database_url(database_url)
    if parsed.drivername == SQLITE_DRIVER and not is_sqlite_memory(parsed):
        return Path(parsed.database or "").resolve().parent / "files"
    if not dev_mode:
        raise ConfigError(
            "SWITCHBOARD_CONTEXT_FILES_DIR must name the files directory when the database is "
            "not a SQLite file"
        )
    return None


def temporary_store() -> DirectoryBlobStore:
    """A directory store of this process only, removed when it closes (dev mode, tests)."""
    directory = Path(tempfile.mkdtemp(prefix="switchboard-files-"))
    log.warning("files are kept in a temporary directory, %s, until the process ends", directory)
    return DirectoryBlobStore(directory, ephemeral=True)


def open_blob_store(settings: ContextSettings, *, database_url: str, dev_mode: bool) -> BlobStore:
    """The configured blob store."""
    directory = files_directory(settings, database_url=database_url, dev_mode=dev_mode)
    return temporary_store() if directory is None else DirectoryBlobStore(directory)

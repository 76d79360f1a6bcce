"""Which blob store a process opens: the directory beside the database by default."""

from __future__ import annotations

from pathlib import Path

from switchboard.context.files.blobs import BlobStore
from switchboard.context.files.dirblobs import DirectoryBlobStore


def open_blob_store(directory: Path) -> BlobStore:
    """The configured blob store; ``directory`` is the files directory the settings chose
    (``context_files_dir``, or beside the SQLite database)."""
    return DirectoryBlobStore(directory)

"""A signing key written to a file: what ``switchboard keygen`` and the mesh's first run do.

Here, not in the command line module, so that the launcher makes the mesh's key
without calling the command line (which imports the launcher).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from switchboard.platform.security.credentials.accesstokens import (
    KeyRing,
    SigningKey,
    private_key_pem,
)


def write_signing_key(target: Path, *, replace: bool) -> str:
    """A new Ed25519 signing key at ``target`` (PEM, owner-only, atomic); its key id, the
    file's stem. ValueError for a stem that is not a key id; FileExistsError when the
    file exists and ``replace`` is false; OSError when it cannot be written."""
    kid = target.stem
    key = SigningKey.generate(kid)
    KeyRing(key)  # validates the key id
    write_secret_file(target, private_key_pem(key), replace=replace)
    return kid


def write_secret_file(target: Path, data: bytes, *, replace: bool) -> None:
    """Write ``data`` to ``target`` owner-only and atomically: readers see no file or all of it.

    Missing parent directories are created owner-only. The bytes go to a
    temporary file (mkstemp: mode 0600 before any byte is written) in the same
    directory, reach the disk, then take the name: by rename when replacing,
    else by link, which fails rather than overwrite a file that appeared.
    """
    parent = target.parent
    # Path.mkdir(parents=True) would give the intermediate directories the
    # default mode; every directory made here is owner-only.
    for directory in reversed((parent, *parent.parents)):
        if not directory.exists():
            directory.mkdir(mode=0o700)
        elif not directory.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(directory))
    fd, temporary = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(temporary, target)
        else:
            os.link(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)

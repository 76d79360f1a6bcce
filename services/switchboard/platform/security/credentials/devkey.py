"""Dev mode's signing key, kept beside the SQLite database so a restart keeps its tokens.

A key made per process signed everyone out at every restart of ``make run``:
the README restarts it (to allow loopback, to add the model), and every token a
reader held was then refused. So dev mode without ``SWITCHBOARD_SIGNING_KEYS``
keeps its key in the data directory, beside the database file
(``switchboard.db`` -> ``switchboard.dev-signing-key.pem``), written once
owner-only and read by every later dev-mode start on that database. A new data
directory gets a new key, and the tokens of the old one are refused with a
message that says so (``tokens.UNKNOWN_KEY``). A database that is not a file
(PostgreSQL, ``:memory:``) has nowhere to keep it: such a process makes a key of
its own, as before.

Outside dev mode this file is never read or written: the key ring is
``SWITCHBOARD_SIGNING_KEYS`` and nothing else (``mesh.configured_key_ring``). A key file
that is not a regular file of this user, readable by it alone, is refused, not
repaired: a key others can read signs tokens anyone can forge.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization

from switchboard.platform.config import SQLITE_DRIVER
from switchboard.platform.security.credentials.accesstokens import SigningKey, private_key_pem
from switchboard.platform.security.credentials.keyfile import write_secret_file
from switchboard.platform.store.db import is_sqlite_memory, parse_database_url

#: The key's file: the database file's stem and this (gitignored as such).
SUFFIX: Final = ".dev-signing-key.pem"
#: A PEM of one Ed25519 key is about 120 bytes; anything near this is not one.
_MAX_BYTES: Final = 16 * 1024


class DevKeyError(ValueError):
    """The dev key file exists but cannot be used; the message says what to do."""


@dataclass(frozen=True)
class DevKey:
    key: SigningKey
    path: Path
    #: Made by this start (else read from an earlier one).
    created: bool


def dev_key_path(database_url: str) -> Path | None:
    """Where dev mode keeps its key for this database; None when it is not a file."""
    parsed = parse_database_url(database_url)
    if parsed.drivername != SQLITE_DRIVER or is_sqlite_memory(parsed):
        return None
    database = Path(parsed.database or "")
    return database.with_name(database.stem + SUFFIX)


def key_id(key: SigningKey) -> str:
    """``dev-`` and the public key's fingerprint: another key, another id.

    A token of a replaced dev key then names a key id this server does not have,
    and is refused as signed by an unknown key, which is what happened.
    """
    raw = key.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "dev-" + hashlib.sha256(raw).hexdigest()[:16]


def dev_signing_key(path: Path) -> DevKey:
    """The key kept at ``path``, or a new one written there. DevKeyError for a file that
    cannot be used, OSError for one that cannot be read or written."""
    try:
        return DevKey(_read(path), path, created=False)
    except FileNotFoundError:
        pass
    if not path.parent.is_dir():  # the database's: never made here
        raise DevKeyError(f"the directory of the dev signing key, {path.parent}, does not exist")
    generated = SigningKey.generate()
    key = SigningKey(key_id(generated), generated.private_key)
    try:
        write_secret_file(path, private_key_pem(key), replace=False)
    except FileExistsError:
        # Another start wrote it first: theirs is the key.
        return DevKey(_read(path), path, created=False)
    return DevKey(key, path, created=True)


def _read(path: Path) -> SigningKey:
    remedy = f"delete {path} to make a new one (signing everyone out)"
    try:
        # O_NOFOLLOW: a link planted at the name must not pick the key file.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DevKeyError(f"the dev signing key {path} is a symbolic link; {remedy}") from None
        raise
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DevKeyError(f"the dev signing key {path} is not a regular file; {remedy}")
        if info.st_uid != os.geteuid():
            raise DevKeyError(
                f"the dev signing key {path} belongs to another user; {remedy}, or serve as "
                "its owner"
            )
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise DevKeyError(
                f"the dev signing key {path} can be read or written by other users "
                f"(mode {mode:04o}): run chmod 600 {path}, or {remedy}"
            )
        pem = file.read(_MAX_BYTES + 1)
    not_a_key = f"the dev signing key {path} is not an unencrypted Ed25519 PEM; {remedy}"
    if len(pem) > _MAX_BYTES:
        raise DevKeyError(not_a_key)
    try:
        loaded = SigningKey.from_pem("dev", pem)
    except (ValueError, TypeError):
        raise DevKeyError(not_a_key) from None
    return SigningKey(key_id(loaded), loaded.private_key)

"""Credentials at rest: sealed with AES-256-GCM under a key derived from the server secret.

A database dump or backup must not hand out the API keys of every integration,
so a credential is stored only sealed. The layout of a sealed value::

    version (1 byte, 0x01) | nonce (12 random bytes) | ciphertext | GCM tag (16 bytes)

- The key is ``HKDF-SHA256(server secret, salt=_SALT, info=b"...v1")``: the
  server secret itself (which also signs page tokens) never touches the data,
  and a new format gets a new ``info`` label and version byte.
- The nonce is random per seal (96 bits; safe for far more seals than any
  deployment makes under one key).
- ``purpose`` (say the integration's resource name and the field) is
  authenticated as associated data together with the version byte: a value
  copied to another row, or read for another use, does not open.

Changing ``SWITCHBOARD_SECRET_KEY`` makes every stored credential unreadable:
``open`` raises ``SecretUnreadable`` (FAILED_PRECONDITION, "set the credential
again"), never the content and never a cryptographic detail.
"""

from __future__ import annotations

import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from switchboard.platform.errors import RequestTooLarge, SecretUnreadable

__all__ = ["MAX_PLAINTEXT_BYTES", "SecretBox", "SecretUnreadable"]

VERSION: Final = 1
#: Largest plaintext sealed (credentials are tokens and keys, not documents).
MAX_PLAINTEXT_BYTES: Final = 64 * 1024
_NONCE_BYTES: Final = 12
_TAG_BYTES: Final = 16
_SALT: Final = b"switchboard/secretbox"
_INFO: Final = b"switchboard secretbox v1 aes-256-gcm"


class SecretBox:
    """Seals and opens short secrets under a key derived from the server secret."""

    __slots__ = ("_aead",)

    def __init__(self, secret_key: str) -> None:
        if not secret_key:
            raise ValueError("SecretBox needs the server secret")
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=_INFO).derive(
            secret_key.encode()
        )
        # Only the cipher object is kept: no attribute holds the key as text.
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SecretBox(<key hidden>)"

    def seal(self, plaintext: str, *, purpose: str) -> bytes:
        """The sealed form of ``plaintext``, bound to ``purpose``."""
        if not purpose:
            raise ValueError("purpose must name what the secret is for")
        data = plaintext.encode()
        if len(data) > MAX_PLAINTEXT_BYTES:
            raise RequestTooLarge(f"a credential may be at most {MAX_PLAINTEXT_BYTES} bytes")
        header = bytes([VERSION])
        nonce = os.urandom(_NONCE_BYTES)
        return header + nonce + self._aead.encrypt(nonce, data, _associated(header, purpose))

    def open(self, sealed: bytes | bytearray | memoryview, *, purpose: str) -> str:
        """The plaintext sealed for ``purpose``; ``SecretUnreadable`` if it does not open."""
        data = bytes(sealed)
        if len(data) < 1 + _NONCE_BYTES + _TAG_BYTES or data[0] != VERSION:
            raise SecretUnreadable
        header, nonce, body = data[:1], data[1 : 1 + _NONCE_BYTES], data[1 + _NONCE_BYTES :]
        try:
            plaintext = self._aead.decrypt(nonce, body, _associated(header, purpose))
        except InvalidTag:
            raise SecretUnreadable from None
        try:
            return plaintext.decode()
        except UnicodeDecodeError:
            raise SecretUnreadable from None


def _associated(header: bytes, purpose: str) -> bytes:
    return header + purpose.encode()

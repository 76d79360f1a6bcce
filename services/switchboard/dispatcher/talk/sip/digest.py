"""SIP digest authentication of a trunk's INVITEs (RFC 3261 22, RFC 2617's MD5 with
``qop=auth``), as a carrier's "credential list" sends it.

PJSIP's user agent API challenges nothing it receives, so the screen does it: an INVITE
from a trunk with credentials and no ``Authorization`` is answered ``401`` with a
challenge; the carrier sends it again with its answer, checked here against the trunk's
username and password. The nonce is stateless (its time and an HMAC of it under a key
made at start), so a challenge costs no memory and a flood of them none either; a nonce
older than ``NONCE_TTL_S`` is answered with a fresh challenge (``stale=true``), one from
another process or a forged one with ``403``. Runs on the engine's thread: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Final

REALM: Final = "switchboard"
#: How long a challenge's nonce may be answered.
NONCE_TTL_S: Final = 300
_PARAM: Final = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True)
class Answer:
    """What an ``Authorization: Digest ...`` header says."""

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    qop: str = ""
    nc: str = ""
    cnonce: str = ""
    algorithm: str = "MD5"


def parse(header: str) -> Answer | None:
    """The header's value (after ``Authorization:``); None unless it is a Digest answer
    with every field it needs."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM.finditer(rest)
    }
    needed = ("username", "realm", "nonce", "uri", "response")
    if any(not params.get(name) for name in needed):
        return None
    return Answer(
        username=params["username"],
        realm=params["realm"],
        nonce=params["nonce"],
        uri=params["uri"],
        response=params["response"].lower(),
        qop=params.get("qop", ""),
        nc=params.get("nc", ""),
        cnonce=params.get("cnonce", ""),
        algorithm=params.get("algorithm", "MD5"),
    )


class Digest:
    """Challenges and checks (see the module doc)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key or secrets.token_bytes(32)

    def challenge(self, *, stale: bool = False, now: float | None = None) -> str:
        """A ``WWW-Authenticate`` value."""
        issued = int(time.time() if now is None else now)
        nonce = f"{issued:x}.{self._sign(issued)}"
        value = f'Digest realm="{REALM}", nonce="{nonce}", algorithm=MD5, qop="auth"'
        return value + (", stale=true" if stale else "")

    def check(
        self,
        answer: Answer,
        *,
        method: str,
        request_uri: str,
        username: str,
        password: str,
        now: float | None = None,
    ) -> str:
        """ "ok", "stale" (a fresh challenge is due) or "wrong"."""
        if answer.realm != REALM or answer.algorithm.upper() != "MD5":
            return "wrong"
        if answer.uri != request_uri:
            return "wrong"
        issued = self._issued(answer.nonce)
        if issued is None:
            return "wrong"
        ha1 = _md5(f"{username}:{REALM}:{password}")
        ha2 = _md5(f"{method}:{answer.uri}")
        if answer.qop:
            if answer.qop != "auth" or not answer.nc or not answer.cnonce:
                return "wrong"
            expected = _md5(f"{ha1}:{answer.nonce}:{answer.nc}:{answer.cnonce}:auth:{ha2}")
        else:
            expected = _md5(f"{ha1}:{answer.nonce}:{ha2}")
        # Compared whole whatever the username, so a wrong name and a wrong password
        # take the same time and say the same.
        right = hmac.compare_digest(expected, answer.response) and hmac.compare_digest(
            answer.username.encode(), username.encode()
        )
        if not right:
            return "wrong"
        current = time.time() if now is None else now
        if not 0 <= current - issued <= NONCE_TTL_S:
            return "stale"
        return "ok"

    def _sign(self, issued: int) -> str:
        return hmac.new(self._key, str(issued).encode(), hashlib.sha256).hexdigest()[:32]

    def _issued(self, nonce: str) -> int | None:
        stamp, _, signature = nonce.partition(".")
        try:
            issued = int(stamp, 16)
        except ValueError:
            return None
        if not hmac.compare_digest(self._sign(issued), signature):
            return None
        return issued


def _md5(text: str) -> str:
    # MD5 is what SIP digest is (RFC 2617; carriers send nothing else), not a choice.
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()

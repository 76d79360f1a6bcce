"""Who may open a call: the carriers' signatures, and the ticket that joins a stream to
its webhook.

- **Twilio** signs each request with its account's auth token: ``X-Twilio-Signature`` is
  base64 of HMAC-SHA1 over the full URL it requested (as configured: the public one)
  followed by each POST parameter's name and value, sorted by name. The WebSocket's
  upgrade is signed the same way over its ``wss://`` URL, without parameters.
- **Telnyx** signs with ed25519: ``telnyx-signature-ed25519`` (base64) over
  ``{telnyx-timestamp}|{body}``, checked with the account's public key; a timestamp more
  than ``MAX_SKEW_S`` away is refused, so a captured request cannot be replayed later.
- **The ticket.** The webhook's answer carries a short-lived token (``TICKET_TTL_S``) in
  the stream's ``<Parameter name="call">``: the rule chosen, the caller, the number dialed
  and the carrier's call id, signed (HMAC-SHA256) under a key derived at start from the
  server secret (``SWITCHBOARD_SECRET_KEY``), as page tokens are: behind Envoy a webhook
  and its stream may reach two replicas, and each accepts the other's tickets. A stream
  without such a ticket, or with one expired, already used (in this process), or for
  another call, is closed before anything is looked up; so no stream is carried that
  did not follow a signed webhook.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

#: How long a webhook's ticket may open its stream: the carrier opens it at once.
TICKET_TTL_S: Final = 60
#: How far a Telnyx timestamp may be from our clock.
MAX_SKEW_S: Final = 300
#: The most tickets remembered as used (each for its TTL).
MAX_USED: Final = 10_000
MAX_TICKET_CHARS: Final = 2048


def twilio_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]] = ()) -> str:
    """What Twilio sends in ``X-Twilio-Signature`` for ``url`` and its POST ``params``."""
    # Sorted by name, and a repeated name's distinct values sorted too (Twilio's helpers).
    data = url + "".join(name + value for name, value in sorted(set(params)))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def twilio_valid(
    auth_token: str, url: str, params: Iterable[tuple[str, str]], signature: str | None
) -> bool:
    if not signature:
        return False
    expected = twilio_signature(auth_token, url, params)
    return hmac.compare_digest(expected.encode(), signature.strip().encode())


def telnyx_valid(
    key: Ed25519PublicKey,
    timestamp: str | None,
    body: bytes,
    signature: str | None,
    now: float | None = None,
) -> bool:
    if not timestamp or not signature or not timestamp.strip().isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > MAX_SKEW_S:
        return False
    try:
        raw = base64.b64decode(signature.strip(), validate=True)
        key.verify(raw, timestamp.strip().encode() + b"|" + body)
    except (binascii.Error, ValueError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True)
class Ticket:
    """What a webhook's answer lets one stream do."""

    carrier: str
    #: The dispatch rule's index in the dialplan.
    rule: int
    caller: str
    dialed: str
    call_id: str
    expires: int


_PURPOSE: Final = b"switchboard media-stream tickets v1"


class Tickets:
    """Made and redeemed under one key (see the module doc); a random one without
    ``secret``."""

    def __init__(self, secret: str = "") -> None:
        if secret:
            self._key = hmac.new(secret.encode(), _PURPOSE, hashlib.sha256).digest()
        else:
            self._key = secrets.token_bytes(32)
        #: Call ids whose ticket was used, with when it expires.
        self._used: dict[str, int] = {}

    def issue(
        self,
        *,
        carrier: str,
        rule: int,
        caller: str,
        dialed: str,
        call_id: str,
        now: float | None = None,
    ) -> str:
        expires = int(time.time() if now is None else now) + TICKET_TTL_S
        ticket = Ticket(carrier, rule, caller, dialed, call_id, expires)
        body = base64.urlsafe_b64encode(
            json.dumps(asdict(ticket), separators=(",", ":")).encode()
        ).decode()
        return f"{body}.{self._sign(body)}"

    def redeem(self, token: str, carrier: str, now: float | None = None) -> Ticket | None:
        """The ticket ``token`` is, if this process made it for ``carrier``, it has not
        expired, and no stream used it; it is used from here on."""
        if len(token) > MAX_TICKET_CHARS:
            return None
        body, _, signature = token.partition(".")
        if not signature or not hmac.compare_digest(self._sign(body), signature):
            return None
        try:
            fields = json.loads(base64.urlsafe_b64decode(body.encode()))
            ticket = Ticket(**fields)
        except (ValueError, TypeError):
            return None
        current = int(time.time() if now is None else now)
        if ticket.carrier != carrier or ticket.expires < current:
            return None
        self._forget(current)
        if ticket.call_id in self._used or len(self._used) >= MAX_USED:
            return None
        self._used[ticket.call_id] = ticket.expires
        return ticket

    def _forget(self, now: int) -> None:
        for call_id in [c for c, expires in self._used.items() if expires < now]:
            del self._used[call_id]

    def _sign(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()

"""The carriers' signatures and the webhook's ticket (``talk/streams/signing.py``):
Twilio's published example vectors; Telnyx's ed25519 over ``timestamp|body`` within its
window; a ticket redeemed once, for its carrier, before it expires, and never forged."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from switchboard.dispatcher.talk.streams.signing import (
    TICKET_TTL_S,
    Tickets,
    telnyx_valid,
    twilio_signature,
    twilio_valid,
)

pytestmark = pytest.mark.unit

#: Twilio's documented example (its helpers' tests use it): token, URL, form, signature.
TOKEN = "12345"
URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
FORM = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+14158675309",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
}
NOW = 1_800_000_000.0


def test_twilio_signatures_match_the_published_vectors() -> None:
    assert twilio_signature(TOKEN, URL, FORM.items()) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    # A repeated name: its distinct values, sorted.
    repeated = [
        ("Sid", "CA123"),
        ("SidAccount", "AC123"),
        ("Digits", "5678"),
        ("Digits", "1234"),
        ("Digits", "1234"),
    ]
    assert twilio_signature(TOKEN, URL, repeated) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="
    assert twilio_valid(TOKEN, URL, FORM.items(), "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not twilio_valid(TOKEN, URL + "&x=1", FORM.items(), "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not twilio_valid(
        TOKEN, URL, {**FORM, "Digits": "9"}.items(), "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    )
    assert not twilio_valid("54321", URL, FORM.items(), "RSOYDt4T1cUTdK1PDd93/VVr8B8=")
    assert not twilio_valid(TOKEN, URL, FORM.items(), None)
    assert not twilio_valid(TOKEN, URL, FORM.items(), "")


def test_telnyx_signatures_hold_within_their_window() -> None:
    key = Ed25519PrivateKey.generate()
    body = b"CallSid=v3%3Aabc&To=%2B15550100"
    stamp = str(int(NOW))
    signature = base64.b64encode(key.sign(stamp.encode() + b"|" + body)).decode()
    public = key.public_key()
    assert telnyx_valid(public, stamp, body, signature, now=NOW)
    assert telnyx_valid(public, stamp, body, signature, now=NOW + 299)
    assert not telnyx_valid(public, stamp, body, signature, now=NOW + 301)
    assert not telnyx_valid(public, stamp, body + b"&x=1", signature, now=NOW)
    assert not telnyx_valid(public, str(int(NOW) + 1), body, signature, now=NOW)
    other = Ed25519PrivateKey.generate().public_key()
    assert not telnyx_valid(other, stamp, body, signature, now=NOW)
    for bad in (None, "", "not base64!", base64.b64encode(b"short").decode()):
        assert not telnyx_valid(public, stamp, body, bad, now=NOW)
    assert not telnyx_valid(public, None, body, signature, now=NOW)
    assert not telnyx_valid(public, "soon", body, signature, now=NOW)


def issue(tickets: Tickets, call_id: str = "CA1", carrier: str = "twilio") -> str:
    return tickets.issue(
        carrier=carrier, rule=0, caller="+1555", dialed="+1666", call_id=call_id, now=NOW
    )


def test_a_ticket_is_redeemed_once_for_its_carrier_before_it_expires() -> None:
    tickets = Tickets()
    token = issue(tickets)
    assert tickets.redeem(token, "telnyx", now=NOW) is None
    assert tickets.redeem(token, "twilio", now=NOW + TICKET_TTL_S + 1) is None
    ticket = tickets.redeem(token, "twilio", now=NOW + 1)
    assert ticket is not None
    assert (ticket.rule, ticket.caller, ticket.dialed, ticket.call_id) == (
        0,
        "+1555",
        "+1666",
        "CA1",
    )
    assert tickets.redeem(token, "twilio", now=NOW + 2) is None  # spent
    # Another process's key, a changed body, garbage: none of them.
    assert tickets.redeem(issue(Tickets(), "CA2"), "twilio", now=NOW) is None
    body, _, signature = issue(tickets, "CA3").partition(".")
    assert tickets.redeem(body[:-2] + "AA." + signature, "twilio", now=NOW) is None
    for garbage in ("", ".", "x.y", "a" * 5000):
        assert tickets.redeem(garbage, "twilio", now=NOW) is None


def test_replicas_sharing_the_server_secret_accept_each_others_tickets() -> None:
    secret = "a-server-secret-of-at-least-32-characters"
    token = issue(Tickets(secret))
    assert Tickets(secret).redeem(token, "twilio", now=NOW) is not None
    assert Tickets(secret + "!").redeem(token, "twilio", now=NOW) is None

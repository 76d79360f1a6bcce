"""Trunks and dispatch rules (``talk/sip/rules.py``) and SIP's settings: what a call is
matched by, and every mistake refused at start with the entry and the field named."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import SecretStr, ValidationError

from switchboard.dispatcher.talk.sip.calls import CallLimits, Calls
from switchboard.dispatcher.talk.sip.engine import Invite, Refusal
from switchboard.dispatcher.talk.sip.rules import Dialplan, InviteRate
from switchboard.dispatcher.talk.sip.settings import SipSettings, listen
from tests.kits.certs import self_signed

pytestmark = pytest.mark.unit

TRUNKS = json.dumps(
    [
        {"name": "carrier", "addresses": ["203.0.113.0/24", "2001:db8::/32"]},
        {"name": "office", "addresses": ["198.51.100.7"]},
    ]
)
RULES = json.dumps(
    [
        {
            "number": "+15550100",
            "trunks": ["carrier"],
            "assistant": "workspaces/w1/assistants/a1",
            "user": "users/u1",
            "callers": {"+15557654321": "users/u2"},
            "transfer": {"desk": "sip:desk@pbx.example.com"},
        },
        {"number": "*", "assistant": "workspaces/w2/assistants/a2", "user": "users/u3"},
    ]
)


def test_a_call_is_matched_by_its_trunk_then_its_number_first_rule_first() -> None:
    plan = Dialplan.read(TRUNKS, RULES)
    carrier = plan.trunk_of("203.0.113.9")
    assert carrier is not None
    assert carrier.name == "carrier"
    assert plan.trunk_of("2001:db8::1") is carrier
    assert plan.trunk_of("192.0.2.1") is None
    assert plan.trunk_of("not an address") is None
    rule = plan.rule_for("carrier", "+15550100")
    assert rule is not None
    assert str(rule.assistant) == "workspaces/w1/assistants/a1"
    assert rule.workspace_id == "w1"
    # The first rule listens on the carrier only: the office's call to it falls to '*'.
    other = plan.rule_for("office", "+15550100")
    assert other is not None
    assert other.workspace_id == "w2"
    assert plan.rule_for("carrier", "+15559999") is other


def test_a_listed_caller_acts_as_its_user_and_any_other_as_the_rules() -> None:
    rule = Dialplan.read(TRUNKS, RULES).rules[0]
    assert rule.acts_as("+15557654321") == (rule.callers["+15557654321"], True)
    user, known = rule.acts_as("+15550000")
    assert (str(user), known) == ("users/u1", False)
    assert rule.transfer == {"desk": "sip:desk@pbx.example.com"}


def test_a_trunk_with_credentials_and_no_addresses_is_known_by_its_username() -> None:
    plan = Dialplan.read(
        '[{"name": "anywhere", "username": "carrier", "password": "a long trunk secret"}]', ""
    )
    assert plan.open_trunks
    assert plan.trunk_of("192.0.2.1") is None
    named = plan.trunk_named("carrier")
    assert named is not None
    assert named.authenticates
    assert "secret" not in repr(named)
    assert plan.trunk_named("someone") is None


def test_an_outbound_trunk_calls_its_prefixes_for_its_workspaces_and_takes_no_calls_in() -> None:
    plan = Dialplan.read(
        json.dumps(
            [
                {
                    "name": "out",
                    "outbound": {
                        "to": "sip:pstn.example.net:5060",
                        "caller_id": "+15550100",
                        "workspaces": ["acme"],
                        "numbers": ["+1", "+4420"],
                        "username": "sb",
                        "password": "a-long-outbound-secret",
                    },
                }
            ]
        ),
        "",
    )
    found = plan.outbound("out")
    assert found is not None
    trunk, outbound = found
    assert outbound.allows("acme", "+15551230001")
    assert outbound.allows("acme", "+442079460000")
    assert not outbound.allows("acme", "+33142685300")
    assert not outbound.allows("other", "+15551230001")
    assert outbound.uri("+15551230001") == "sip:+15551230001@pstn.example.net:5060"
    assert "a-long-outbound-secret" not in repr(outbound)
    # It takes no calls in: no address matches it, no username names it.
    assert not trunk.takes_calls
    assert plan.trunk_of("203.0.113.9") is None
    assert plan.trunk_named("") is None
    assert not plan.open_trunks
    assert plan.outbound("nowhere") is None


def test_no_rules_match_nothing() -> None:
    plan = Dialplan.read("", "")
    assert plan.trunk_of("127.0.0.1") is None
    assert plan.rule_for("any", "+1") is None


@pytest.mark.parametrize(
    ("trunks", "rules", "words"),
    [
        ("{", "", "SIP trunks: not JSON"),
        ('{"name": "x"}', "", "a JSON list of objects"),
        ('[{"name": "Bad Name", "addresses": ["10.0.0.0/8"]}]', "", "trunks[0].name"),
        ('[{"name": "a", "addresses": []}]', "", "trunks[0].addresses: 1 to 64"),
        ('[{"name": "a", "addresses": [], "username": "u"}]', "", "or neither"),
        (
            '[{"name": "a", "username": "u", "password": "short"}]',
            "",
            "the password at least 12 long",
        ),
        (
            '[{"name": "a", "username": "u", "password": "long enough pass"}, '
            '{"name": "b", "username": "u", "password": "long enough pass"}]',
            "",
            "the same username",
        ),
        ('[{"name": "a", "addresses": ["10.0.0.300"]}]', "", "trunks[0].addresses[0]"),
        ('[{"name": "a", "addresses": ["10.0.0.1"], "secret": "x"}]', "", "unknown field"),
        (
            '[{"name": "a", "addresses": ["10.0.0.1"]}, {"name": "a", "addresses": ["10.0.0.2"]}]',
            "",
            "the same name",
        ),
        (
            "",
            '[{"number": "", "assistant": "workspaces/w/assistants/a", "user": "users/u"}]',
            "rules[0].number",
        ),
        (
            "",
            '[{"number": "1", "assistant": "workspaces/w", "user": "users/u"}]',
            "rules[0]: assistant",
        ),
        (
            "",
            '[{"number": "1", "assistant": "workspaces/w/assistants/a", "user": "u"}]',
            "rules[0]: user",
        ),
        (
            "",
            '[{"number": "1", "assistant": "workspaces/w/assistants/a", "user": "users/u", '
            '"trunks": ["nowhere"]}]',
            "rules[0].trunks",
        ),
        (
            "",
            '[{"number": "1", "assistant": "workspaces/w/assistants/a", "user": "users/u", '
            '"callers": {"+1": "bob"}}]',
            "rules[0].callers['+1']",
        ),
        (
            "",
            '[{"number": "1", "assistant": "workspaces/w/assistants/a", "user": "users/u", '
            '"transfer": {"desk": "http://desk.example.com"}}]',
            "rules[0].transfer['desk']",
        ),
        ('[{"name": "a", "outbound": {}}]', "", "trunks[0].outbound: an object"),
        (
            '[{"name": "a", "outbound": {"to": "sip:u@h", "caller_id": "+15550100", '
            '"workspaces": ["w"], "numbers": ["+1"]}}]',
            "",
            "trunks[0].outbound.to",
        ),
        (
            '[{"name": "a", "outbound": {"to": "sip:h", "caller_id": "5550100", '
            '"workspaces": ["w"], "numbers": ["+1"]}}]',
            "",
            "trunks[0].outbound.caller_id",
        ),
        (
            '[{"name": "a", "outbound": {"to": "sip:h", "caller_id": "+15550100", '
            '"workspaces": [], "numbers": ["+1"]}}]',
            "",
            "trunks[0].outbound.workspaces",
        ),
        (
            '[{"name": "a", "outbound": {"to": "sip:h", "caller_id": "+15550100", '
            '"workspaces": ["w"], "numbers": ["1"]}}]',
            "",
            "trunks[0].outbound.numbers",
        ),
        (
            '[{"name": "a", "outbound": {"to": "sip:h", "caller_id": "+15550100", '
            '"workspaces": ["w"], "numbers": ["+1"], "username": "u"}}]',
            "",
            "trunks[0].outbound: a username",
        ),
    ],
)
def test_a_mistake_is_refused_naming_the_entry_and_field(
    trunks: str, rules: str, words: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        Dialplan.read(trunks, rules)


def test_settings_refuse_a_bad_plan_listen_address_or_port_range() -> None:
    with pytest.raises(ValueError, match="trunks"):
        SipSettings(sip_trunks="[1]")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="host:port"):
        SipSettings(sip_listen="nowhere")
    with pytest.raises(ValueError, match="port range"):
        SipSettings(sip_rtp_ports="9-8")
    assert listen("") is None
    assert listen("[::1]:5060") == ("::1", 5060)
    assert listen("0.0.0.0:0") == ("0.0.0.0", 0)


def test_the_invite_rate_refuses_a_flood_from_one_address_only() -> None:
    rate = InviteRate(rate=2.0, burst=3)
    assert [rate.take("a", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert rate.take("b", now=0.0)  # another address has its own bucket
    assert not rate.take("a", now=0.4)  # 0.8 of a token: still none
    assert rate.take("a", now=0.6)  # a token a half second


def _settings(**values: Any) -> SipSettings:
    return SipSettings.model_validate(
        {k: SecretStr(v) if k in {"sip_trunks", "sip_rules"} else v for k, v in values.items()}
    )


def test_settings_that_cannot_work_stop_the_process_in_words(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    trunk = json.dumps([{"name": "t", "addresses": ["10.0.0.0/8"], "tls": True, "srtp": True}])
    with pytest.raises(ValidationError, match="SWITCHBOARD_SIP_TLS_LISTEN: a trunk calls over"):
        _settings(sip_listen="127.0.0.1:0", sip_trunks=trunk)
    with pytest.raises(ValidationError, match="SWITCHBOARD_SIP_TLS_KEY: a readable PEM file"):
        _settings(
            sip_listen="127.0.0.1:0",
            sip_tls_listen="127.0.0.1:0",
            sip_tls_cert=str(cert),
            sip_tls_key=str(tmp_path / "missing.pem"),
        )
    with pytest.raises(ValidationError, match="srtp: needs tls"):
        _settings(sip_trunks=json.dumps([{"name": "t", "addresses": ["10.0.0.0/8"], "srtp": True}]))
    with pytest.raises(ValidationError, match="tls and srtp are true or false"):
        _settings(sip_trunks=json.dumps([{"name": "t", "addresses": ["10.0.0.0/8"], "tls": 1}]))
    fine = _settings(
        sip_listen="127.0.0.1:0",
        sip_tls_listen="127.0.0.1:0",
        sip_tls_cert=str(cert),
        sip_tls_key=str(key),
        sip_trunks=trunk,
    )
    assert fine.sip_tls_listen == "127.0.0.1:0"


def test_a_trunk_over_tls_is_held_to_it_before_any_challenge() -> None:
    trunks = [
        {"name": "roaming", "username": "pbx", "password": "a-long-trunk-secret", "tls": True},
        {"name": "office", "addresses": ["10.0.0.0/8"], "tls": True, "srtp": True},
    ]
    rules = [{"number": "+15550100", "assistant": "workspaces/w/assistants/a", "user": "users/u"}]
    # The screen reads the plan and its own rate and digest only: nothing else is reached.
    calls = Calls(
        plan=Dialplan.read(json.dumps(trunks), json.dumps(rules)),
        talks=cast(Any, None),
        context=cast(Any, None),
        policy=cast(Any, None),
        limits=CallLimits(invite_burst=100),
        book=cast(Any, None),
    )
    anywhere = Invite(call=1, source="203.0.113.5", dialed="+15550100", caller="+1", display="")
    # A trunk known by its credentials only: over UDP, no challenge is sent (its answer
    # would travel in the clear); over TLS, it is challenged.
    assert calls.screen(anywhere) == Refusal(403, "TLS required")
    challenge = calls.screen(replace(anywhere, tls=True))
    assert challenge is not None
    assert challenge.code == 401
    office = replace(anywhere, source="10.1.2.3")
    assert calls.screen(office) == Refusal(403, "TLS required")
    assert calls.screen(replace(office, tls=True)) == Refusal(488, "SRTP required")
    assert calls.screen(replace(office, tls=True, srtp_offered=True)) is None

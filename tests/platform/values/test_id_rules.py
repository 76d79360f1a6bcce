"""The ids a client chooses (workspaces, assistants, integrations) follow one rule per kind,
said the same way everywhere: the server matches ``names.CHOSEN_IDS``' patterns and says the
rule in words when it refuses one; the console builds its hints and input patterns from
clients/web/src/idrules.json; the contracts' comments state it. These tests keep the three
from drifting apart (the console once allowed 2 characters where the server wanted 3)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Final

import pytest

from switchboard.integration.kinds.mcp import parse_stdio_servers
from switchboard.platform.values import names

pytestmark = pytest.mark.unit

ROOT: Final = Path(__file__).resolve().parents[3]
CONSOLE_RULES: Final = ROOT / "clients" / "web" / "src" / "idrules.json"
#: Where each chosen id's field is declared in the contracts.
CONTRACTS: Final = {
    "workspace_id": ROOT / "proto/switchboard/api/context/v1/context.proto",
    "assistant_id": ROOT / "proto/switchboard/api/dispatcher/v1/dispatcher.proto",
    "integration_id": ROOT / "proto/switchboard/api/integration/v1/integration.proto",
}
WORDS: Final = "lowercase letters, digits and hyphens, starting with a letter"


@pytest.mark.parametrize("field", sorted(names.CHOSEN_IDS))
def test_each_rule_accepts_exactly_what_its_words_say(field: str) -> None:
    rule = names.CHOSEN_IDS[field]
    assert rule.words == f"{rule.shortest} to {rule.longest} characters: {WORDS}"
    assert rule.must == f"must be {rule.words}"
    shortest = "a" + "b" * (rule.shortest - 1)
    longest = "a" + "-9" * ((rule.longest - 1) // 2) + "z" * ((rule.longest - 1) % 2)
    assert len(longest) == rule.longest
    for good in (shortest, longest, "a-1" + "x" * max(0, rule.shortest - 3)):
        assert rule.regex.fullmatch(good), good
    for bad in (shortest[:-1], longest + "a", "1" + shortest, "A" + shortest, shortest + "_x"):
        assert not rule.regex.fullmatch(bad), bad


def test_a_workspace_id_needs_three_characters_and_the_others_two() -> None:
    assert names.CHOSEN_IDS["workspace_id"].shortest == 3
    assert names.CHOSEN_IDS["assistant_id"].shortest == 2
    assert names.CHOSEN_IDS["integration_id"].shortest == 2
    assert names.WORKSPACE_ID.pattern == "[a-z][a-z0-9-]{2,62}"
    assert names.CLIENT_ID.pattern == "[a-z][a-z0-9-]{1,62}"


def test_the_console_states_the_servers_rules() -> None:
    """The console's hints and input patterns come from idrules.json: it must say exactly
    what the server enforces (regenerate it from ``names.CHOSEN_IDS`` if this fails)."""
    expected = {
        field: {"shortest": rule.shortest, "longest": rule.longest, "words": rule.words}
        for field, rule in names.CHOSEN_IDS.items()
    }
    assert json.loads(CONSOLE_RULES.read_text()) == expected, json.dumps(expected, indent=2)


@pytest.mark.parametrize("field", sorted(CONTRACTS))
def test_the_contracts_state_the_same_rule(field: str) -> None:
    """The comment on each id field says the rule in the server's words, and its pattern."""
    rule = names.CHOSEN_IDS[field]
    lines = CONTRACTS[field].read_text().splitlines()
    [at] = [i for i, line in enumerate(lines) if re.match(rf"\s*string {field} = \d+;", line)]
    comment: list[str] = []
    for line in reversed(lines[:at]):
        if not line.strip().startswith("//"):
            break
        comment.insert(0, line.strip().removeprefix("//").strip())
    text = " ".join(comment)
    assert rule.words in text, text
    assert f"`{rule.regex.pattern}`" in text, text


def test_an_operators_ids_are_refused_with_the_rule_in_words() -> None:
    with pytest.raises(ValueError, match="stdio MCP server id") as raised:
        parse_stdio_servers('{"Files": {"command": ["true"]}}')
    assert str(raised.value) == f"stdio MCP server id 'Files' {names.CLIENT_ID_RULE.must}"

"""Resource-name and identifier patterns match whole strings only."""

from __future__ import annotations

import datetime as dt
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from google.protobuf import timestamp_pb2

from switchboard.platform.errors import InvalidArgument
from switchboard.platform.security.policy import owner_of
from switchboard.platform.store.storage import IDEMPOTENCY_TTL
from switchboard.platform.values import names

pytestmark = pytest.mark.unit

PATTERNS = {
    value: attr
    for attr, value in vars(names).items()
    if isinstance(value, re.Pattern) and attr.isupper()
}
SAMPLES = {
    "WORKSPACE": "workspaces/acme",
    "CONVERSATION": "workspaces/acme/conversations/c1",
    "MESSAGE": "workspaces/acme/conversations/c1/messages/m1",
    "RUN": "workspaces/acme/conversations/c1/runs/r1",
    "MEMBER": "workspaces/acme/members/u1",
    "ASSISTANT": "workspaces/acme/assistants/calc",
    "INTEGRATION": "workspaces/acme/integrations/mcp-1",
    "BUDGET": "workspaces/acme/budgets/daily",
    "FILE": "workspaces/acme/files/report",
    "UPLOAD": "workspaces/acme/uploads/u-1",
    "VOICE_SESSION": "workspaces/acme/conversations/c-1/voiceSessions/s-1",
    "WORKSPACE_QUOTA": "workspaces/acme/quota",
    "SEMANTIC_INDEX": "workspaces/acme/semanticIndex",
    "TOOL": "workspaces/acme/integrations/mcp-1/tools/get-sum",
    "TOOL_NAME": "get-sum",
    "TOOL_SEGMENT": "with~20space.Echo",
    "USER": "users/u1",
    "SESSION": "users/u1/sessions/s1",
    "DATA_EXPORT": "users/u1/exports/e1",
    "API_KEY": "users/u1/apiKeys/k1",
    "MEMORY_SCOPE": "workspaces/acme/conversations/c1",
    "MEMORY_ITEM": "users/u1/memories/m1",
    "UNDER_WORKSPACE": "workspaces/acme/conversations/c1",
    "UNDER_USER": "users/u1/apiKeys/k1",
    "REQUEST_ID": "req_1-A",
    "ETAG": 'W/"12"',
    "CLIENT_ID": "calc",
    "WORKSPACE_ID": "acme",
    "CLIENT_LABEL": "req.1:a",
}


def test_new_ids_are_ids_and_differ() -> None:
    # Past several refills of the per-thread buffer of random bytes.
    made = {names.new_id() for _ in range(2000)}
    assert len(made) == 2000
    assert all(re.fullmatch(names.ID, made_id) and len(made_id) == 32 for made_id in made)


def test_new_ids_differ_across_threads() -> None:
    with ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(lambda _: [names.new_id() for _ in range(600)], range(8)))
    made = [made_id for batch in batches for made_id in batch]
    assert len(set(made)) == len(made)


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    names.new_id()  # the parent has buffered random bytes the child would inherit
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(write, " ".join(names.new_id() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read) as pipe:
        theirs = pipe.read().split()
    ours = [names.new_id() for _ in range(3)]
    assert len(theirs) == 3
    assert not set(theirs) & set(ours)


def test_now_is_aware_utc() -> None:
    assert names.now().utcoffset() == dt.timedelta(0)


def test_every_pattern_has_a_sample() -> None:
    assert sorted(PATTERNS.values()) == sorted(SAMPLES)


@pytest.mark.parametrize("attr", sorted(SAMPLES))
@pytest.mark.parametrize("suffix", ["\n", "\r\n", " ", "/", "\x00", "\u2028"])
def test_a_pattern_refuses_anything_after_a_valid_value(attr: str, suffix: str) -> None:
    pattern: re.Pattern[str] = getattr(names, attr)
    assert pattern.fullmatch(SAMPLES[attr])
    assert pattern.fullmatch(SAMPLES[attr] + suffix) is None
    assert pattern.fullmatch(suffix + SAMPLES[attr]) is None


def test_match_refuses_a_trailing_newline_naming_the_field() -> None:
    form = "workspaces/{workspace}"
    assert names.match(names.WORKSPACE, "workspaces/acme", "name", form).group(1) == "acme"
    with pytest.raises(InvalidArgument) as caught:
        names.match(names.WORKSPACE, "workspaces/acme\n", "name", form)
    assert [v.field for v in caught.value.violations] == ["name"]
    assert form in caught.value.violations[0].description


def test_owner_of_refuses_a_trailing_newline() -> None:
    assert owner_of("workspaces/acme/conversations/c1", "parent").id == "acme"
    with pytest.raises(InvalidArgument):
        owner_of("workspaces/acme\n", "parent")
    with pytest.raises(InvalidArgument):
        owner_of("users/u1/apiKeys/k1\n", "name")


@pytest.mark.parametrize(
    ("etag", "version"),
    [
        ('"5"', 5),
        ('W/"5"', 5),
        ("5", 5),
        ('"²"', None),  # str.isdigit() says yes, int() says no
        ('"١٢"', None),  # non-ASCII digits
        ('"' + "9" * 19 + '"', None),  # would overflow a BIGINT column
        ('"5"\n', None),
        (' "5"', None),
        ('"+5"', None),
        ('"1_0"', None),
        ("", None),
    ],
)
def test_etag_version(etag: str, version: int | None) -> None:
    assert names.etag_version(etag) == version


def test_every_request_id_field_documents_its_format_and_scope() -> None:
    """The contract says what ``request_id`` accepts, and says what the server enforces."""
    root = Path(__file__).resolve().parents[3] / "proto"
    fields = 0
    for proto in sorted(root.rglob("*.proto")):
        lines = proto.read_text().splitlines()
        for index, line in enumerate(lines):
            if not re.fullmatch(r"\s*string request_id = \d+;", line):
                continue
            fields += 1
            comment: list[str] = []
            for above in reversed(lines[:index]):
                if not above.strip().startswith("//"):
                    break
                comment.insert(0, above.strip().removeprefix("//").strip())
            text = " ".join(comment)
            assert "1-64 ASCII letters, digits, `-` or `_`" in text, (proto.name, index)
            assert "24 hours" in text, (proto.name, index)
            assert "caller and this method" in text, (proto.name, index)
    assert fields >= 4
    assert names.REQUEST_ID.pattern == r"[A-Za-z0-9_-]{1,64}"
    assert dt.timedelta(hours=24) == IDEMPOTENCY_TTL


def test_stamp_now_sets_what_from_datetime_of_now_sets() -> None:
    before = names.now()
    stamp = timestamp_pb2.Timestamp()
    names.stamp_now(stamp)
    after = names.now()
    assert before <= stamp.ToDatetime(tzinfo=dt.UTC) <= after
    assert stamp.nanos % 1000 == 0
    same = timestamp_pb2.Timestamp()
    same.FromDatetime(stamp.ToDatetime(tzinfo=dt.UTC))
    assert same == stamp

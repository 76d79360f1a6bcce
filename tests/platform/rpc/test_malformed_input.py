"""Every method answers malformed input precisely: never UNKNOWN or INTERNAL, never a trace.

Walks every method the mesh serves (its five services, health and reflection)
and sends it, with hypothesis, (1) random bytes as the request body, signed in
and not, and (2) random well-typed requests built from the method's request
descriptor, signed in, whose strings include the names of real resources of the
caller's workspace with a trailing newline, forged page tokens signed with the
real server secret, and out-of-range Timestamp/Duration values. The server
runs on its own event loop in a thread, so hypothesis drives plain
synchronous calls; it logs nothing at ERROR while this happens.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.context.v1 import context_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as dpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2_grpc
from switchboard.api.events.v1 import events_pb2 as epb
from switchboard.auth.accounts import Accounts, ClientContext
from switchboard.auth.store import AuthStore
from switchboard.mesh import COMPANIONS, SERVICES, create_server
from switchboard.platform.rpc.interceptors import MALFORMED_LOG_INTERVAL_S
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.policy import AuthMethod
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, built, make_settings
from tests.kits.authkit import bearer, unique_email
from tests.kits.contextkit import violations

pytestmark = pytest.mark.service

T = TypeVar("T")
MAX_BYTES_EXAMPLES = 8
MAX_TYPED_EXAMPLES = 40
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
# What a leaked exception looks like in a status message.
LEAK = re.compile(r"Traceback|\b[A-Z]\w*(?:Error|Exception)\b|File \"|\.py\b|<class '")
# Methods that end the caller's sessions or delete the world run last.
DESTRUCTIVE = re.compile(r"/(Delete|Remove|Revoke|Logout|Purge|Prune)")


# -- the server, on its own loop ----------------------------------------------------------


class Served:
    """A mesh on a private event loop in a thread; ``run`` awaits on it from the test thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.mesh: SwitchboardServer
        self.user: Any = None
        self.names: list[str] = []
        self.page_tokens: list[str] = []
        self.secret = ""

    def start(self, settings_: Settings) -> None:
        async def start() -> SwitchboardServer:
            server, _ = await create_server(settings_)
            await server.start()
            return server

        self.mesh = self.run(start())
        self.secret = settings_.kernel.effective_secret_key()
        self.user = self.run(
            AuthStore(self.mesh.shared.database).create_user(unique_email("fuzz"), "Fuzz", None)
        )

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def fresh_token(self) -> str:
        """A new session of the test user: earlier examples may have revoked the last one."""
        sign_in = self.run(
            built(self.mesh, Accounts).start_session(
                self.user, AuthMethod.PASSWORD, ClientContext(address="127.0.0.1")
            )
        )
        return str(sign_in.tokens.access_token)

    def stop(self) -> None:
        self.run(self.mesh.shutdown(grace=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()


@dataclass
class Logged(logging.Handler):
    """The records logged at ``floor`` or worse (``message``: only those saying it); by
    default every ERROR (or worse) logged anywhere while the module runs."""

    floor: int = logging.ERROR
    message: str = ""
    records: list[logging.LogRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.floor)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.message or record.getMessage() == self.message:
            self.records.append(record)

    def __hash__(self) -> int:
        return id(self)


@pytest.fixture(scope="module")
def errors() -> Iterator[Logged]:
    handler = Logged()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


@pytest.fixture(autouse=True)
def _fresh_errors(errors: Logged) -> None:
    """Each test judges only what it caused."""
    errors.records.clear()


@pytest.fixture(scope="module")
def served(errors: Logged) -> Iterator[Served]:
    served = Served()
    settings_ = make_settings(
        events_heartbeat_s=0.5,
        dispatcher_heartbeat_s=0.5,
        context_max_writes_per_minute=1_000_000,
        dispatcher_max_messages_per_minute_per_user=1_000_000,
        dispatcher_max_messages_per_minute_per_workspace=1_000_000,
        max_sessions_per_user=10_000,
    )

    served.start(settings_)
    try:
        _populate(served)
        yield served
    finally:
        served.stop()


def _populate(served: Served) -> None:
    """Real resources of the signed-in user, whose names the typed requests use."""
    md = bearer(served.fresh_token())
    other = bearer(_other_user_token(served))
    with grpc.insecure_channel(served.mesh.address) as channel:
        ctx = context_pb2_grpc.ContextServiceStub(channel)
        disp = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
        workspaces = [
            ctx.CreateWorkspace(
                cpb.CreateWorkspaceRequest(workspace=cpb.Workspace(display_name=f"W{i}")),
                metadata=md,
                timeout=CALL_DEADLINE_S,
            ).workspace.name
            for i in range(2)
        ]
        foreign = ctx.CreateWorkspace(
            cpb.CreateWorkspaceRequest(workspace=cpb.Workspace(display_name="Other")),
            metadata=other,
            timeout=CALL_DEADLINE_S,
        ).workspace.name
        conversation = ctx.CreateConversation(
            cpb.CreateConversationRequest(
                parent=workspaces[0], conversation=cpb.Conversation(title="T")
            ),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        ).conversation.name
        sent = disp.SendMessage(
            dpb.SendMessageRequest(
                conversation=conversation,
                message=cpb.Message(parts=[cpb.ContentPart(text="hello there")]),
            ),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        )
        memories = [
            ctx.CreateMemoryItem(
                cpb.CreateMemoryItemRequest(
                    parent=workspaces[0],
                    memory_item=cpb.MemoryItem(content=f"a fact {i}", kind=cpb.MEMORY_KIND_FACT),
                ),
                metadata=md,
                timeout=CALL_DEADLINE_S,
            ).memory_item.name
            for i in range(2)
        ]
        for _ in range(2):
            ctx.CreateConversation(
                cpb.CreateConversationRequest(
                    parent=workspaces[0], conversation=cpb.Conversation(title="more")
                ),
                metadata=md,
                timeout=CALL_DEADLINE_S,
            )
        page = ctx.ListConversations(
            cpb.ListConversationsRequest(parent=workspaces[0], page_size=1),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        )
        served.page_tokens.append(page.next_page_token)
        found = ctx.SearchMemoryItems(
            cpb.SearchMemoryItemsRequest(parent=workspaces[0], query="fact", page_size=1),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        )
        served.page_tokens.append(found.next_page_token)
    user = f"users/{served.user.id}"
    served.names += [
        *workspaces,
        f"{workspaces[0]}/quota",
        foreign,
        conversation,
        sent.message.name,
        sent.run.name,
        *memories,
        f"{workspaces[0]}/members/{served.user.id}",
        user,
        f"{user}/memories/none",
        f"{user}/sessions/none",
        f"{user}/apiKeys/none",
        "handlers/echo",
    ]


def _other_user_token(served: Served) -> str:
    other = served.run(
        AuthStore(served.mesh.shared.database).create_user(unique_email("other"), "Other", None)
    )
    sign_in = served.run(
        built(served.mesh, Accounts).start_session(
            other, AuthMethod.PASSWORD, ClientContext(address="127.0.0.1")
        )
    )
    return str(sign_in.tokens.access_token)


# -- methods --------------------------------------------------------------------------------


def _methods() -> list[MethodDescriptor]:
    pool = descriptor_pool.Default()
    services = [descriptor for descriptor, _, _ in SERVICES.values()]
    services += [companion for companions in COMPANIONS.values() for companion in companions]
    services.append(health_pb2.DESCRIPTOR.services_by_name["Health"])
    # Importing the reflection module registers its v1alpha descriptors; v1 is
    # registered when a server starts, so both are looked up by name below.
    import grpc_reflection.v1alpha.reflection_pb2  # noqa: F401

    services.append(pool.FindServiceByName("grpc.reflection.v1alpha.ServerReflection"))
    methods = [method for service in services for method in service.methods]
    return sorted(methods, key=lambda m: (bool(DESTRUCTIVE.search(_path(m))), _path(m)))


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


METHODS = _methods()


@dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    details: str


def call(channel: Any, method: MethodDescriptor, body: bytes, md: tuple[Any, ...]) -> Answer:
    """Send ``body`` as the request (one message for a client stream), read one response."""
    path = _path(method)
    try:
        if not method.server_streaming:
            if method.client_streaming:
                channel.stream_unary(path)(iter([body]), metadata=md, timeout=CALL_DEADLINE_S)
            else:
                channel.unary_unary(path)(body, metadata=md, timeout=CALL_DEADLINE_S)
            return Answer(grpc.StatusCode.OK, "")
        if method.client_streaming:
            stream = channel.stream_stream(path)(iter([body]), metadata=md, timeout=CALL_DEADLINE_S)
        else:
            stream = channel.unary_stream(path)(body, metadata=md, timeout=CALL_DEADLINE_S)
        try:
            next(stream)
        except StopIteration:
            return Answer(stream.code(), stream.details() or "")
        stream.cancel()
        return Answer(grpc.StatusCode.OK, "")
    except grpc.RpcError as error:
        return Answer(error.code(), error.details() or "")


def check(answer: Answer, errors: Logged, what: object) -> None:
    assert answer.code not in FORBIDDEN, (answer, what)
    assert not LEAK.search(answer.details), (answer, what)
    logged = [r.getMessage() for r in errors.records]
    errors.records.clear()
    assert logged == [], (logged, what)


@pytest.fixture(scope="module")
def channel(served: Served) -> Iterator[Any]:
    with grpc.insecure_channel(served.mesh.address) as chan:
        yield chan


# -- (1) random bytes -------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS, ids=_path)
def test_random_bytes_are_answered_precisely(
    method: MethodDescriptor, served: Served, channel: Any, errors: Logged
) -> None:
    token = served.fresh_token()

    @settings(
        max_examples=MAX_BYTES_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )
    @given(st.binary(max_size=64) | st.sampled_from([b"\xff", b"\x0a\x05ab", b"\x08\x80"]))
    def property_(body: bytes) -> None:
        for md in ((), bearer(token)):
            check(call(channel, method, body, md), errors, body)

    property_()


def test_an_undecodable_body_names_the_message_not_the_parser(
    served: Served, channel: Any, errors: Logged
) -> None:
    md = bearer(served.fresh_token())
    for method in METHODS:
        answer = call(channel, method, b"\xff\xff\xff", md)
        assert answer.code == grpc.StatusCode.INVALID_ARGUMENT, (_path(method), answer)
        assert answer.details == f"the request body is not a valid {method.input_type.full_name}"
    check(Answer(grpc.StatusCode.OK, ""), errors, "logs")


# -- (2) random well-typed requests ---------------------------------------------------------

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
SECONDS = [0, 1, -1, 30, 1_900_000_000, 2**62, -(2**62), 253_402_300_800, -62_135_596_801]
NANOS = [0, 5, -1, 999_999_999, 1_000_000_000, -(2**31)]
FREE_TEXT = st.text(
    # No E, T or y: random text cannot spell what LEAK looks for.
    alphabet=st.characters(codec="utf-8", blacklist_characters="ETy"),
    max_size=24,
)


def _forged(secret: str, key: list[Any], fingerprint: str = "0" * 16) -> str:
    derived = hmac.new(secret.encode(), b"switchboard/page-token/v1", hashlib.sha256).digest()
    body = json.dumps([1, key, fingerprint], separators=(",", ":")).encode()
    mac = hmac.new(derived, body, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(mac + body).decode().rstrip("=")


def _forged_like(secret: str, token: str, key: list[Any]) -> str:
    """``token`` with its key replaced: the real fingerprint, signed with the real secret."""
    padded = token + "=" * (-len(token) % 4)
    try:
        _, _, fingerprint = json.loads(base64.urlsafe_b64decode(padded)[16:])
    except ValueError:  # not a token of this format: any fingerprint will do
        fingerprint = "0" * 16
    return _forged(secret, key, fingerprint)


@dataclass(frozen=True)
class Strings:
    """Strings for request fields: any of them anywhere, the likely ones where they fit."""

    exact: list[str]
    variants: list[str]
    tokens: list[str]
    specials: list[str]

    def pick(self, draw: Any, rng: random.Random, f: FieldDescriptor) -> str:
        if f.name == "page_token" and rng.random() < 0.6:
            return rng.choice(self.tokens)
        if f.name in NAME_FIELDS or f.name.endswith("name"):
            fitting = [n for n in self.exact if _fits(n, f)]
            if fitting and rng.random() < 0.6:
                return rng.choice(fitting)
            if rng.random() < 0.5:
                return rng.choice(self.exact if rng.random() < 0.5 else self.variants)
        pools = (self.exact, self.variants, self.tokens, self.specials, None)
        pool = rng.choice(pools)
        return str(draw(FREE_TEXT)) if pool is None else rng.choice(pool)


NAME_FIELDS = {"name", "parent", "conversation", "workspace", "user", "scope", "source"}
KINDS = {
    "workspaces": "Workspace",
    "conversations": "Conversation",
    "messages": "Message",
    "runs": "Run",
    "memories": "Memory",
    "members": "Member",
    "sessions": "Session",
    "apiKeys": "ApiKey",
    "users": "User",
    "handlers": "Handler",
}


def _fits(name: str, f: FieldDescriptor) -> bool:
    """Whether ``name`` is the kind of resource ``f`` probably holds (a guess from names)."""
    segments = name.split("/")
    kind = KINDS.get(segments[-2] if len(segments) >= 2 else "", "")
    if f.name == "parent":
        return kind in ("Workspace", "Conversation", "User")
    if f.name == "conversation":
        return kind == "Conversation"
    return bool(kind) and f.containing_type is not None and kind in f.containing_type.name


def strings_of(served: Served) -> Strings:
    odd_keys: list[list[Any]] = [
        [-1],
        [10**9],
        [-(2**70), "x"],
        [2**70, "x"],
        ["1", 2],
        [1.5, "a\n"],
        [True, "A" * 300],
        [None, None],
    ]
    tokens = [*served.page_tokens, "", "x" * 3000, "not a token", "AAAA", "%%%"]
    tokens += [_forged(served.secret, key) for key in odd_keys]
    tokens += [_forged_like(served.secret, t, k) for t in served.page_tokens for k in odd_keys]
    variants = [
        variant
        for name in served.names
        for variant in (name + "\n", name + "/", name.upper(), name + "\x00", " " + name)
    ]
    specials = [
        '"1"',
        'W/"99999999999999999999"',
        '"\u00b2"',  # superscript two: str.isdigit() says yes, int() says no
        "18446744073709551616-0",
        "1-1",
        "\u0661-\u0661",  # Arabic-Indic digits
        "0-0\n",
        "a" * 70,
        "x" * 70_000,
        "req_1",
        "req\n",
        "handlers/echo",
        "echo",
        "user@example.com",
        "correct horse battery staple 42",
        "sbk_abcdefgh_" + "A" * 43,
        "sbr_" + "A" * 43,
    ]
    return Strings(list(served.names), variants, tokens, specials)


def json_values() -> st.SearchStrategy[Any]:
    leaves = st.none() | st.booleans() | st.floats() | FREE_TEXT
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(FREE_TEXT, inner, max_size=3),
        max_leaves=6,
    )


@dataclass
class Builder:
    """Builds a random request of any message type from its descriptor.

    Which fields are set and which pool a string comes from are weighted
    choices of one seeded ``Random`` per request (hypothesis favours novel
    values, which would make a real resource name rare); the values
    themselves come from hypothesis strategies.
    """

    strings: Strings

    def build(self, draw: Any, rng: random.Random, descriptor: Descriptor, depth: int) -> Message:
        message = message_factory.GetMessageClass(descriptor)()
        if self._special(draw, rng, descriptor, message) or depth > 3:
            return message
        for f in descriptor.fields:
            # Most fields set, so requests get past their first check.
            if rng.random() < 0.8:
                self._set(draw, rng, message, f, depth)
        return message

    def _special(self, draw: Any, rng: random.Random, descriptor: Descriptor, message: Any) -> bool:
        name = descriptor.full_name
        if name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
            message.seconds = (
                rng.choice(SECONDS) if rng.random() < 0.7 else draw(st.integers(-(2**40), 2**40))
            )
            message.nanos = rng.choice(NANOS)
        elif name == "google.protobuf.Struct":
            message.update(draw(st.dictionaries(FREE_TEXT, json_values(), max_size=4)))
        elif name == "google.protobuf.Value":
            struct = struct_pb2.Struct()
            struct.update({"v": draw(json_values())})
            message.CopyFrom(struct.fields["v"])
        elif name == "google.protobuf.FieldMask":
            paths = [
                *("display_name", "title", "content", "pinned", "metadata", "expire_time"),
                *("etag", "name", "description", "nope", "a.b", ""),
            ]
            message.paths.extend(rng.choice(paths) for _ in range(rng.randint(0, 3)))
        elif name != "google.protobuf.Any":
            return False
        return True

    def _scalar(self, draw: Any, rng: random.Random, f: FieldDescriptor) -> Any:
        if f.type == FieldDescriptor.TYPE_STRING:
            return self.strings.pick(draw, rng, f)
        if f.type == FieldDescriptor.TYPE_BYTES:
            return draw(st.binary(max_size=32))
        if f.type == FieldDescriptor.TYPE_BOOL:
            return rng.random() < 0.5
        if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return draw(st.floats(width=32 if f.type == FieldDescriptor.TYPE_FLOAT else 64))
        if f.type == FieldDescriptor.TYPE_ENUM:
            assert f.enum_type is not None
            values = [v.number for v in f.enum_type.values if v.number]
            return rng.choice(values) if values and rng.random() < 0.8 else rng.choice([0, -1, 999])
        low, high = INT_RANGES[f.type]
        edges = [v for v in (0, 1, -1, 2, 100, 10_000, low, high, 2**31, 2**53) if low <= v <= high]
        return rng.choice(edges) if rng.random() < 0.6 else draw(st.integers(low, high))

    def _set(
        self, draw: Any, rng: random.Random, message: Any, f: FieldDescriptor, depth: int
    ) -> None:
        target = getattr(message, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            key_field = f.message_type.fields_by_name["key"]
            value_field = f.message_type.fields_by_name["value"]
            for _ in range(rng.randint(0, 2)):
                key = self._scalar(draw, rng, key_field)
                if value_field.message_type is not None:
                    target[key].CopyFrom(self.build(draw, rng, value_field.message_type, depth + 1))
                else:
                    target[key] = self._scalar(draw, rng, value_field)
            return
        if f.is_repeated:
            for _ in range(rng.randint(0, 3)):
                if f.message_type is not None:
                    target.add().CopyFrom(self.build(draw, rng, f.message_type, depth + 1))
                else:
                    target.append(self._scalar(draw, rng, f))
            return
        if f.message_type is not None:
            target.CopyFrom(self.build(draw, rng, f.message_type, depth + 1))
            return
        setattr(message, f.name, self._scalar(draw, rng, f))


@st.composite
def requests(draw: Any, builder: Builder, descriptor: Descriptor) -> Message:
    rng = draw(st.randoms(use_true_random=False))
    return builder.build(draw, rng, descriptor, 0)


@pytest.mark.parametrize("method", METHODS, ids=_path)
def test_random_well_typed_requests_are_answered_precisely(
    method: MethodDescriptor, served: Served, channel: Any, errors: Logged
) -> None:
    builder = Builder(strings_of(served))
    token = served.fresh_token()

    @settings(
        max_examples=MAX_TYPED_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )
    @given(requests(builder, method.input_type))
    def property_(request: Message) -> None:
        answer = call(channel, method, request.SerializeToString(), bearer(token))
        check(answer, errors, request)

    property_()


# -- the reported examples, each pinned ---------------------------------------------------


def _context(channel: Any) -> Any:
    return context_pb2_grpc.ContextServiceStub(channel)


def _refused(call_: Any, *, field_: str | None = None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call_()
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    if field_ is not None:
        assert field_ in violations(error), violations(error)
    return caught.value


def _new_conversation(channel: Any, md: Any, workspace: str) -> str:
    created = _context(channel).CreateConversation(
        cpb.CreateConversationRequest(parent=workspace, conversation=cpb.Conversation(title="t")),
        metadata=md,
        timeout=CALL_DEADLINE_S,
    )
    return str(created.conversation.name)


def _new_workspace(channel: Any, md: Any) -> str:
    """A workspace of the caller's own: the property tests may have deleted the shared ones."""
    created = _context(channel).CreateWorkspace(
        cpb.CreateWorkspaceRequest(workspace=cpb.Workspace(display_name="pinned")),
        metadata=md,
        timeout=CALL_DEADLINE_S,
    )
    return str(created.workspace.name)


def _page_tokens(channel: Any, md: Any, workspace: str) -> tuple[str, str]:
    """Real next-page tokens of a conversation list and of a memory search in ``workspace``."""
    for i in range(2):
        _new_conversation(channel, md, workspace)
        _context(channel).CreateMemoryItem(
            cpb.CreateMemoryItemRequest(
                parent=workspace,
                memory_item=cpb.MemoryItem(content=f"a fact {i}", kind=cpb.MEMORY_KIND_FACT),
            ),
            metadata=md,
            timeout=CALL_DEADLINE_S,
        )
    listed = _context(channel).ListConversations(
        cpb.ListConversationsRequest(parent=workspace, page_size=1), metadata=md
    )
    found = _context(channel).SearchMemoryItems(
        cpb.SearchMemoryItemsRequest(parent=workspace, query="fact", page_size=1), metadata=md
    )
    return listed.next_page_token, found.next_page_token


def test_a_trailing_newline_is_not_part_of_a_name(served: Served, channel: Any) -> None:
    md = bearer(served.fresh_token())
    workspace = _new_workspace(channel, md)
    _context(channel).GetWorkspace(cpb.GetWorkspaceRequest(name=workspace), metadata=md)
    _refused(
        lambda: _context(channel).GetWorkspace(
            cpb.GetWorkspaceRequest(name=workspace + "\n"), metadata=md
        ),
        field_="name",
    )
    _refused(
        lambda: _context(channel).CreateMemoryItem(
            cpb.CreateMemoryItemRequest(
                parent=workspace + "\n",
                memory_item=cpb.MemoryItem(content="x", kind=cpb.MEMORY_KIND_FACT),
            ),
            metadata=md,
        ),
        field_="parent",
    )


def test_out_of_range_times_name_their_field(served: Served, channel: Any) -> None:
    md = bearer(served.fresh_token())
    workspace = _new_workspace(channel, md)
    conversation = _new_conversation(channel, md, workspace)
    for seconds, nanos in ((2**62, 0), (253_402_300_800, 0), (1_900_000_000, -1)):
        item = cpb.MemoryItem(content="x", kind=cpb.MEMORY_KIND_FACT)
        item.expire_time.seconds, item.expire_time.nanos = seconds, nanos
        _refused(
            lambda item=item: _context(channel).CreateMemoryItem(
                cpb.CreateMemoryItemRequest(parent=workspace, memory_item=item), metadata=md
            ),
            field_="memory_item.expire_time",
        )
        key = auth_pb2.CreateApiKeyRequest(display_name="k")
        key.expire_time.seconds, key.expire_time.nanos = seconds, nanos
        _refused(
            lambda key=key: channel.unary_unary(
                "/switchboard.api.auth.v1.AuthService/CreateApiKey",
                request_serializer=auth_pb2.CreateApiKeyRequest.SerializeToString,
            )(key, metadata=md),
            field_="expire_time",
        )
    stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
    for seconds in (2**62, -(2**62)):
        send = dpb.SendMessageRequest(
            conversation=conversation,
            message=cpb.Message(parts=[cpb.ContentPart(text="hi")]),
        )
        send.timeout.seconds = seconds
        _refused(lambda send=send: stub.SendMessage(send, metadata=md), field_="timeout")


def test_forged_page_tokens_are_refused(served: Served, channel: Any) -> None:
    """A token signed with the old constant key, or one with an odd key, never reaches a query."""
    md = bearer(served.fresh_token())
    workspace = _new_workspace(channel, md)
    real, search = _page_tokens(channel, md, workspace)
    constant = hmac.new(
        b"switchboard-page-token", b'[1,[-5],"0000000000000000"]', hashlib.sha256
    ).digest()[:8]
    old_style = base64.urlsafe_b64encode(constant + b'[1,[-5],"0000000000000000"]').decode()
    for token in (
        old_style,
        _forged_like(served.secret, real, [-1, "x"]),
        _forged_like(served.secret, real, [2**70, "x"]),
        _forged_like(served.secret, real, [1, "X\n"]),
    ):
        _refused(
            lambda token=token: _context(channel).ListConversations(
                cpb.ListConversationsRequest(parent=workspace, page_token=token), metadata=md
            ),
            field_="page_token",
        )
    # The real fingerprint of a search: offset 1 is the second page, -1 is refused (it was
    # the first page again), and so is an offset past the search window.

    def probe(token: str) -> Any:
        return _context(channel).SearchMemoryItems(
            cpb.SearchMemoryItemsRequest(
                parent=workspace, query="fact", page_size=1, page_token=token
            ),
            metadata=md,
        )

    assert len(probe(_forged_like(served.secret, search, [1])).results) == 1
    for key in ([-1], [10**9], ["1"]):
        _refused(
            lambda key=key: probe(_forged_like(served.secret, search, key)), field_="page_token"
        )


# -- client streams and the log ------------------------------------------------------------


def _frames() -> tuple[queue.Queue[bytes | None], Iterator[bytes]]:
    """A request stream the test feeds one frame at a time (None ends it)."""
    pending: queue.Queue[bytes | None] = queue.Queue()

    def frames() -> Iterator[bytes]:
        while (frame := pending.get()) is not None:
            yield frame

    return pending, frames()


def test_a_malformed_frame_ends_a_busy_converse_with_invalid_argument(
    served: Served, channel: Any, errors: Logged
) -> None:
    """Also while a relayed run is still streaming: the stream ends now, not with the run."""
    md = bearer(served.fresh_token())
    stub = dispatcher_pb2_grpc.DispatcherServiceStub(channel)
    slow = dpb.SendMessageRequest(
        conversation=_new_conversation(channel, md, _new_workspace(channel, md)),
        message=cpb.Message(parts=[cpb.ContentPart(text="one two three four five six")]),
    )
    slow.parameters.update({"delay_ms": 20_000})  # about two minutes in all
    run = stub.SendMessage(slow, metadata=md, timeout=CALL_DEADLINE_S).run.name
    pending, frames = _frames()
    stream = channel.stream_stream("/switchboard.api.dispatcher.v1.DispatcherService/Converse")(
        frames, metadata=md, timeout=60
    )
    watch = dpb.ConverseRequest(watch_run=dpb.WatchRunRequest(name=run))
    pending.put(watch.SerializeToString())
    next(stream)  # the relay runs
    pending.put(b"\xff\xff\xff")
    try:
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stream:
                pass
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert error.details() == "the request body is not a valid " + (
            "switchboard.api.dispatcher.v1.ConverseRequest"
        )
        state = stub.GetRun(dpb.GetRunRequest(name=run), metadata=md, timeout=CALL_DEADLINE_S)
        assert state.run.state == dpb.RUN_STATE_RUNNING  # the stream did not wait for the run
    finally:
        pending.put(None)
        stub.CancelRun(dpb.CancelRunRequest(name=run), metadata=md, timeout=CALL_DEADLINE_S)
    check(Answer(grpc.StatusCode.OK, ""), errors, "logs")


def test_a_malformed_frame_ends_a_voice_session_with_invalid_argument(
    served: Served, channel: Any, errors: Logged
) -> None:
    """Talk's first frame is read like any other: bytes that are no TalkRequest end
    the stream before anything is stored."""
    md = bearer(served.fresh_token())
    pending, frames = _frames()
    stream = channel.stream_stream("/switchboard.api.dispatcher.v1.DispatcherService/Talk")(
        frames, metadata=md, timeout=60
    )
    pending.put(b"\xff\xff\xff")
    try:
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stream:
                pass
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert error.details() == "the request body is not a valid " + (
            "switchboard.api.dispatcher.v1.TalkRequest"
        )
    finally:
        pending.put(None)
    check(Answer(grpc.StatusCode.OK, ""), errors, "logs")


def test_a_malformed_frame_ends_an_event_stream_with_invalid_argument(
    served: Served, channel: Any, errors: Logged
) -> None:
    md = bearer(served.fresh_token())
    pending, frames = _frames()
    stream = channel.stream_stream("/switchboard.api.events.v1.EventService/Stream")(
        frames, metadata=md, timeout=60
    )
    add = epb.StreamRequest(
        add=epb.AddSubscription(
            subscription_id="s1", scopes=[epb.Scope(workspace=_new_workspace(channel, md))]
        )
    )
    pending.put(add.SerializeToString())
    added = epb.StreamResponse.FromString(next(stream))
    assert added.WhichOneof("frame") == "added", added
    pending.put(b"\xff\xff\xff")
    try:
        with pytest.raises(grpc.RpcError) as caught:
            for _ in stream:
                pass
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert error.details().endswith("events.v1.StreamRequest")
    finally:
        pending.put(None)
    check(Answer(grpc.StatusCode.OK, ""), errors, "logs")


def test_a_flood_of_malformed_requests_logs_one_line_per_interval(errors: Logged) -> None:
    flood = Served()
    flood.start(make_settings())
    lines = Logged(logging.DEBUG, "malformed request body")
    logging.getLogger("switchboard.access").addHandler(lines)
    try:
        with grpc.insecure_channel(flood.mesh.address) as chan:
            started = time.monotonic()
            for method in METHODS[:20] * 10:
                call(chan, method, b"\xff\xff\xff", ())
            elapsed = time.monotonic() - started
    finally:
        logging.getLogger("switchboard.access").removeHandler(lines)
        flood.stop()
    # 200 malformed requests, the first logged, the rest inside its quiet interval
    # (one more line per interval if this machine took that long).
    allowed = 1 + int(elapsed // MALFORMED_LOG_INTERVAL_S)
    assert 1 <= len(lines.records) <= allowed, (len(lines.records), elapsed)
    assert all(record.exc_info is None for record in lines.records)
    check(Answer(grpc.StatusCode.OK, ""), errors, "no traceback anywhere")

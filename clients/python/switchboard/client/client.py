"""``Client``: one channel to a Switchboard deployment, signed in, with typed calls."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, TypeAlias

import grpc
from google.protobuf import struct_pb2
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2, context_pb2_grpc
from switchboard.api.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from switchboard.api.events.v1 import events_pb2_grpc
from switchboard.api.integration.v1 import integration_pb2_grpc
from switchboard.client import session as account
from switchboard.client.backoff import Backoff
from switchboard.client.errors import DataLoss, DeadlineExceeded, Unauthenticated, Unavailable
from switchboard.client.events import Follower, ScopeLike, TypeLike
from switchboard.client.files import (
    Destination,
    Source,
    TransferPolicy,
    download,
    upload_resumable,
    upload_streamed,
)
from switchboard.client.memory import (
    MemoryLike,
    ValidityLike,
    memory_kind,
    memory_validity,
    name_and_etag,
    timestamp,
)
from switchboard.client.runs import Answer, Child, RunTree, RunWatch
from switchboard.client.session import (
    DEFAULT_EXPORT_WAIT_S,
    DEFAULT_REFRESH_MARGIN_S,
    Clock,
    ExportLike,
    RefreshNotSent,
    TokenKeeper,
    TokensCallback,
    export_name,
)
from switchboard.client.transport.interceptors import CallPolicy, RetryPolicy
from switchboard.client.transport.streams import StreamPolicy
from switchboard.client.voice import (
    MAX_FRAME_BYTES,
    OnResume,
    TalkSession,
    TurnDetectionLike,
    TurnDetectorLike,
    TurnEagernessLike,
    talk_start,
)

if TYPE_CHECKING:
    from switchboard.api.auth.v1.auth_pb2_grpc import AuthServiceAsyncStub
    from switchboard.api.context.v1.context_pb2_grpc import ContextServiceAsyncStub
    from switchboard.api.dispatcher.v1.dispatcher_pb2_grpc import DispatcherServiceAsyncStub
    from switchboard.api.events.v1.events_pb2_grpc import EventServiceAsyncStub
    from switchboard.api.integration.v1.integration_pb2_grpc import IntegrationServiceAsyncStub

USER_AGENT: Final = "switchboard-python-client/0.1"
DEFAULT_TIMEOUT_S: Final = 30.0

#: Keepalive inside the server's limits (SWITCHBOARD_KEEPALIVE_*): pings no
#: more often than every 60 s (the server counts a strike below 30 s, and sends
#: GOAWAY after 2), so a dead connection under a quiet stream is noticed within
#: about 80 s even where heartbeats are filtered out. Pings are allowed on
#: streams that send nothing (a Subscribe only receives), never without calls.
KEEPALIVE_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
)
#: gRPC's reconnect backoff grows to 120 s: a server back after a restart
#: would be ignored that long. Capped, it is found within seconds.
RECONNECT_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 3_000),
)


def channel_options(
    user_agent: str = USER_AGENT, options: Sequence[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    """The options a client channel uses: ``options``, then each default they do not name.

    gRPC takes an option's first value, so a caller's option must come before the
    default it replaces (placed after it, it would be ignored)."""
    named = {name for name, _ in options}
    defaults = [*KEEPALIVE_OPTIONS, *RECONNECT_OPTIONS, ("grpc.primary_user_agent", user_agent)]
    return [*options, *(option for option in defaults if option[0] not in named)]


def new_request_id() -> str:
    """An idempotency key: 32 hex digits, inside the contract's 1-64 of [A-Za-z0-9_-]."""
    return uuid.uuid4().hex


def handler_name(handler: str) -> str:
    """``handlers/echo`` from ``echo`` or ``handlers/echo`` ('' stays '')."""
    if not handler or handler.startswith("handlers/"):
        return handler
    return f"handlers/{handler}"


def _user_message(text: str, files: Sequence[str | context_pb2.File]) -> context_pb2.Message:
    """A user message: its text, then a file part naming each stored file."""
    parts = [context_pb2.ContentPart(text=text)]
    for file in files:
        name = file if isinstance(file, str) else file.name
        parts.append(context_pb2.ContentPart(file=context_pb2.FileReference(file=name)))
    return context_pb2.Message(parts=parts)


#: What names a run: its name, the run itself, or a child run as its parent's updates
#: show it (``Child``, or the ``ChildRun`` message).
RunLike = str | dispatcher_pb2.Run | dispatcher_pb2.ChildRun | Child


def run_name(run: RunLike) -> str:
    """The name of the run ``run`` stands for."""
    if isinstance(run, str):
        return run
    if isinstance(run, dispatcher_pb2.ChildRun):
        return run.run
    return run.name


def run_workspace(name: str) -> str:
    """``workspaces/{w}`` of a run's name; ValueError if it is not one."""
    parts = name.split("/")
    shaped = len(parts) == 6 and parts[0::2] == ["workspaces", "conversations", "runs"]
    if not shaped or not all(parts[1::2]):
        shape = "workspaces/{w}/conversations/{c}/runs/{r}"
        raise ValueError(f"{name!r} is not a run's name: {shape}")
    return f"workspaces/{parts[1]}"


#: An assistant: its name, or the assistant itself (whose ``etag`` then goes along).
AssistantLike = str | dispatcher_pb2.Assistant
#: Revisions per ListAssistantRevisions call unless told: the server's own default.
DEFAULT_REVISIONS_PAGE: Final = 20


def _assistant_name_and_etag(assistant: AssistantLike) -> tuple[str, str]:
    if isinstance(assistant, str):
        return assistant, ""
    return assistant.name, assistant.etag


def _name_and_etag(schedule: str | dispatcher_pb2.Schedule) -> tuple[str, str]:
    if isinstance(schedule, str):
        return schedule, ""
    return schedule.name, schedule.etag


#: A phone call: its name (``workspaces/w/calls/c``) or the ``Call`` itself.
CallLike: TypeAlias = str | dispatcher_pb2.Call
#: A call's state, as the enum or its name (``"answered"``, ``"CALL_STATE_ENDED"``).
CallStateLike: TypeAlias = dispatcher_pb2.CallState.ValueType | str
#: Longer than the longest ring timeout the server allows (120 s), so that a wait for
#: ANSWERED with the default ends with the call answered or ended.
DEFAULT_CALL_WAIT_S: Final = 150.0
#: A call changes a few times in its life, most of them a person's act (picking up,
#: hanging up): a read every 2 s at most sees each soon enough and costs the server little.
CALL_POLL: Final = Backoff(initial_s=0.1, max_s=2.0, multiplier=2.0, jitter=0.2)


def call_name(call: CallLike) -> str:
    """The name of the call ``call`` stands for."""
    return call if isinstance(call, str) else call.name


def call_state(value: CallStateLike) -> dispatcher_pb2.CallState.ValueType:
    """A ``CallState`` from the enum or its name, with or without ``CALL_STATE_``, in any
    case; ValueError for a name the contract does not have."""
    if isinstance(value, int):
        return dispatcher_pb2.CallState.ValueType(value)
    name = value.upper()
    prefix = "CALL_STATE_"
    return dispatcher_pb2.CallState.Value(name if name.startswith(prefix) else prefix + name)


async def connected(channel: aio.Channel, within_s: float) -> bool:
    """Whether ``channel`` is (or becomes, within ``within_s``) connected."""
    try:
        async with asyncio.timeout(within_s):
            state = channel.get_state(try_to_connect=True)
            while state != grpc.ChannelConnectivity.READY:
                if state == grpc.ChannelConnectivity.SHUTDOWN:
                    return False
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
            return True
    except TimeoutError:
        return False


class Client:
    """A client of one Switchboard deployment (one process, or the mesh behind Envoy).

    Use it as an async context manager::

        async with Client("127.0.0.1:50051") as client:
            await client.sign_in("ada@example.com", "a long passphrase 42")
            answer = await client.ask(conversation, "hello")

    Every call carries the credential (a session's access token, renewed before
    it expires, or an API key). Unary calls get ``timeout_s`` unless they pass
    their own ``timeout``, and are retried only where that is safe. The typed
    stubs ``auth``, ``context``, ``dispatcher``, ``integration`` and ``events``
    reach every RPC of the contracts the same way; their unary errors are the
    typed classes of ``switchboard.client.errors``.

    ``tls``: False for plaintext, True for TLS with the system's roots, or
    ``grpc.ChannelCredentials``. ``on_tokens`` is called with every new token
    pair (sign-in, refresh) and with None when the session ends, to persist
    them; ``clock`` (monotonic seconds) decides when tokens are due.
    """

    def __init__(
        self,
        target: str,
        *,
        tls: bool | grpc.ChannelCredentials = False,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        streams: StreamPolicy | None = None,
        on_tokens: TokensCallback | None = None,
        refresh_margin_s: float = DEFAULT_REFRESH_MARGIN_S,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        options: Sequence[tuple[str, Any]] = (),
        # grpc.aio client interceptors (the type stubs' own type for them is unusable).
        interceptors: Sequence[Any] = (),
        user_agent: str = USER_AGENT,
        transfers: TransferPolicy | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.target = target
        self.timeout_s = timeout_s
        self._streams = streams or StreamPolicy()
        self._transfers = transfers or TransferPolicy()
        self.tokens = TokenKeeper(
            self._exchange,
            margin_s=refresh_margin_s,
            clock=clock,
            wall=wall,
            on_tokens=on_tokens,
        )
        # Ours first: the application's interceptors see each attempt with its
        # bearer, as it goes on the wire.
        ours = CallPolicy(self.tokens, default_timeout_s=timeout_s, retry=retry or RetryPolicy())
        chain: list[Any] = [*ours.interceptors(), *interceptors]
        merged = channel_options(user_agent, options)
        if tls is False:
            self.channel = aio.insecure_channel(target, options=merged, interceptors=chain)
        else:
            credentials = grpc.ssl_channel_credentials() if tls is True else tls
            self.channel = aio.secure_channel(
                target, credentials, options=merged, interceptors=chain
            )
        self.auth: AuthServiceAsyncStub = auth_pb2_grpc.AuthServiceStub(self.channel)
        self.context: ContextServiceAsyncStub = context_pb2_grpc.ContextServiceStub(self.channel)
        self.dispatcher: DispatcherServiceAsyncStub = dispatcher_pb2_grpc.DispatcherServiceStub(
            self.channel
        )
        self.integration: IntegrationServiceAsyncStub = integration_pb2_grpc.IntegrationServiceStub(
            self.channel
        )
        self.events: EventServiceAsyncStub = events_pb2_grpc.EventServiceStub(self.channel)

    # -- lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel: calls and streams still open are cancelled."""
        await self.tokens.close()
        await self.channel.close(None)

    # -- signing in ---------------------------------------------------------------------

    async def register(
        self,
        email: str,
        password: str,
        *,
        display_name: str = "",
        client_info: auth_pb2.ClientInfo | None = None,
    ) -> auth_pb2.RegisterResponse:
        """Create an account; the client is signed in to its first session."""
        response = await self.auth.Register(
            auth_pb2.RegisterRequest(
                email=email,
                password=password,
                display_name=display_name,
                client_info=client_info or self._client_info(),
            )
        )
        await self.tokens.signed_in(response.tokens)
        return response

    async def sign_in(
        self, email: str, password: str, *, client_info: auth_pb2.ClientInfo | None = None
    ) -> auth_pb2.LoginResponse:
        """Sign in with a password: a new session."""
        response = await self.auth.Login(
            auth_pb2.LoginRequest(
                password=auth_pb2.PasswordCredential(email=email, password=password),
                client_info=client_info or self._client_info(),
            )
        )
        await self.tokens.signed_in(response.tokens)
        return response

    async def sign_in_with_id_token(
        self, id_token: str, *, client_info: auth_pb2.ClientInfo | None = None
    ) -> auth_pb2.LoginResponse:
        """Sign in with an ID token from the deployment's OIDC issuer."""
        response = await self.auth.Login(
            auth_pb2.LoginRequest(
                oidc=auth_pb2.OidcCredential(id_token=id_token),
                client_info=client_info or self._client_info(),
            )
        )
        await self.tokens.signed_in(response.tokens)
        return response

    def use_tokens(self, tokens: auth_pb2.TokenPair) -> None:
        """Continue a session from a token pair the application kept (``on_tokens``)."""
        self.tokens.use_session(tokens, fresh=False)

    def use_api_key(self, key: str) -> None:
        """Authenticate every call with an API key (``sbk_...``); nothing to refresh."""
        self.tokens.use_api_key(key)

    async def refresh(self) -> auth_pb2.TokenPair:
        """Renew the session now (it also renews itself when due)."""
        return await self.tokens.refresh()

    async def sign_out(self) -> None:
        """End the session on the server (Logout) and forget the credential.

        With an API key, only the key is forgotten (revoke it with
        ``auth.RevokeApiKey``). If Logout fails for another reason than the
        session being over already, the error is raised and the credential kept,
        so the application can try again.
        """
        if self.tokens.kind == "session":
            # Unauthenticated: over already (expired, revoked, signed out elsewhere).
            with contextlib.suppress(Unauthenticated):
                await self.auth.Logout(auth_pb2.LogoutRequest())
        await self.tokens.signed_out()

    def _client_info(self) -> auth_pb2.ClientInfo:
        return auth_pb2.ClientInfo(user_agent=USER_AGENT)

    async def _exchange(self, refresh_token: str) -> auth_pb2.TokenPair:
        """One RefreshToken call, sent only over a connected channel (session.py says why)."""
        if not await connected(self.channel, self.timeout_s):
            raise RefreshNotSent(
                Unavailable(
                    f"{self.target} is not reachable; the session is renewed once it is",
                    code=grpc.StatusCode.UNAVAILABLE,
                )
            )
        response = await self.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=refresh_token),
            timeout=self.timeout_s,
            wait_for_ready=True,
        )
        return response.tokens

    # -- runs ---------------------------------------------------------------------------

    async def send(
        self,
        conversation: str,
        text: str,
        *,
        handler: str = "",
        parameters: Mapping[str, Any] | None = None,
        assistant: str = "",
        run_timeout_s: float | None = None,
        concurrency_policy: dispatcher_pb2.ConcurrencyPolicy.ValueType = (
            dispatcher_pb2.CONCURRENCY_POLICY_UNSPECIFIED
        ),
        request_id: str | None = None,
        timeout_s: float | None = None,
        files: Sequence[str | context_pb2.File] = (),
        steer_mode: dispatcher_pb2.SteerMode.ValueType = dispatcher_pb2.STEER_MODE_UNSPECIFIED,
        assistant_revision: int = 0,
        replaces: str = "",
    ) -> dispatcher_pb2.Run:
        """Send a user message and start a run that answers it; the run (usually QUEUED).

        Each send has its own idempotency key (``request_id``, generated unless
        given), so a retry after UNAVAILABLE returns the first run instead of
        starting a second. ``handler`` forces one (``echo`` or ``handlers/echo``);
        ``parameters`` are the handler's (``{"delay_ms": 200}`` for echo).
        ``files`` are stored files of the conversation's workspace (``upload_file``'s
        answers, or their names), sent as file parts after the text.
        ``concurrency_policy=CONCURRENCY_POLICY_STEER`` hands the message to the
        conversation's run in progress (the answer is then the steer's own run,
        ``Run.steer``); ``steer_mode`` is how the run this message starts takes
        steers that arrive while its model writes.
        ``assistant_revision`` answers with that kept revision of ``assistant`` (which
        it needs) instead of the current one, so a change can be tried, or an older
        configuration compared, before everything uses it; the run records the
        revision it used (``Run.assistant_revision``). One the assistant does not
        keep is ``NotFound``.
        ``replaces`` (a user message of the caller's, by name) sends an edit of it:
        the new message becomes its sibling on a new branch, which becomes active, and
        the run answers there (``edit`` says it shorter).
        """
        request = dispatcher_pb2.SendMessageRequest(
            conversation=conversation,
            message=_user_message(text, files),
            handler=handler_name(handler),
            assistant=assistant,
            assistant_revision=assistant_revision,
            request_id=request_id or new_request_id(),
            concurrency_policy=concurrency_policy,
            steer_mode=steer_mode,
            replaces=replaces,
        )
        if parameters:
            struct = struct_pb2.Struct()
            struct.update(dict(parameters))
            request.parameters.CopyFrom(struct)
        if run_timeout_s is not None:
            request.timeout.FromNanoseconds(round(run_timeout_s * 1e9))
        response = await self.dispatcher.SendMessage(request, timeout=timeout_s)
        return response.run

    def watch(
        self, run: RunLike, *, after_sequence: int = 0, merge_deltas: bool = True
    ) -> RunWatch:
        """The run's updates from after ``after_sequence`` to its end, resumed across breaks.

        ``run`` may be a child its parent's watch named (``RunWatch.children``,
        ``child_of``): that follows the child. ``merge_deltas``: the text deltas ready
        together come as one update (``RunUpdate.first_sequence`` .. ``sequence``);
        False, one by one."""
        name = run_name(run)
        return RunWatch(
            self.dispatcher,
            self.tokens,
            name,
            after_sequence=after_sequence,
            policy=self._streams,
            call_timeout_s=self.timeout_s,
            merge_deltas=merge_deltas,
        )

    async def ask(self, conversation: str, text: str, **send: Any) -> Answer:
        """Send a message and wait for the answer (``send``'s keywords apply).

        Raises ``RunFailed`` if the run ends FAILED, CANCELLED or
        DEADLINE_EXCEEDED. The wait itself has no deadline: the run's own
        (``run_timeout_s``, or the server's default) bounds it.
        """
        run = await self.send(conversation, text, **send)
        async with self.watch(run) as watch:
            return await watch.answer()

    # -- branches -----------------------------------------------------------------------

    async def edit(self, message: str, text: str, **send: Any) -> dispatcher_pb2.Run:
        """Edit a message of yours (by name): a new version of it on a new branch,
        made active, and a run answering there (``send``'s keywords apply). Another
        person's message is ``PermissionDenied``."""
        conversation = message.split("/messages/", 1)[0]
        return await self.send(conversation, text, replaces=message, **send)

    async def regenerate(
        self,
        answer: str,
        *,
        request_id: str | None = None,
        concurrency_policy: dispatcher_pb2.ConcurrencyPolicy.ValueType = (
            dispatcher_pb2.CONCURRENCY_POLICY_UNSPECIFIED
        ),
        timeout_s: float | None = None,
    ) -> dispatcher_pb2.Run:
        """RegenerateMessage: a new run answers the question ``answer`` (a message a
        run wrote) answered, on a new branch beside it, made active; the new answer is
        the old one's sibling. Keyed like ``send``, so a retry starts one run."""
        response = await self.dispatcher.RegenerateMessage(
            dispatcher_pb2.RegenerateMessageRequest(
                message=answer,
                request_id=request_id or new_request_id(),
                concurrency_policy=concurrency_policy,
            ),
            timeout=timeout_s,
        )
        return response.run

    async def messages(
        self,
        conversation: str,
        *,
        branch: int = 0,
        limit: int = 1000,
        timeout_s: float | None = None,
    ) -> list[context_pb2.Message]:
        """A branch's messages in order (0: the active branch), every page up to
        ``limit``, each with its versions (``siblings``, ``sibling_position``: a
        "2 / 3" switcher's). The pages stay on the branch the first one read."""
        found: list[context_pb2.Message] = []
        token = ""
        while len(found) < limit:
            response = await self.context.ListMessages(
                context_pb2.ListMessagesRequest(
                    parent=conversation,
                    branch=branch,
                    page_size=min(500, limit - len(found)),
                    page_token=token,
                ),
                timeout=timeout_s,
            )
            found += response.messages
            token = response.next_page_token
            if not token:
                break
        return found[:limit]

    async def switch_branch(
        self,
        conversation: str,
        *,
        message: str = "",
        branch: int = 0,
        etag: str = "",
        timeout_s: float | None = None,
    ) -> context_pb2.Conversation:
        """SwitchBranch: make ``branch``, or the branch through ``message`` that changed
        last (how a switcher picks a sibling's), the active one; ``etag`` refuses it
        after another change (``EtagMismatch``)."""
        response = await self.context.SwitchBranch(
            context_pb2.SwitchBranchRequest(
                conversation=conversation, message=message, branch=branch, etag=etag
            ),
            timeout=timeout_s,
        )
        return response.conversation

    async def create_branch(
        self, conversation: str, *, after: str = "", timeout_s: float | None = None
    ) -> tuple[context_pb2.Conversation, int]:
        """CreateBranch: a new active branch whose history ends at message ``after``
        (empty: no history); the conversation and the branch's number."""
        response = await self.context.CreateBranch(
            context_pb2.CreateBranchRequest(conversation=conversation, after=after),
            timeout=timeout_s,
        )
        return response.conversation, response.branch

    async def fork(
        self,
        message: str,
        *,
        title: str = "",
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> context_pb2.Conversation:
        """ForkConversation: a new conversation sharing the history up to ``message``
        (included; nothing is copied) that goes on on its own (``forked_from`` names
        the message). Keyed, so a retry makes one fork."""
        response = await self.context.ForkConversation(
            context_pb2.ForkConversationRequest(
                message=message,
                conversation=context_pb2.Conversation(title=title),
                request_id=request_id or new_request_id(),
            ),
            timeout=timeout_s,
        )
        return response.conversation

    async def delete_message(
        self,
        message: str,
        *,
        with_later: bool = False,
        branch: int = 0,
        timeout_s: float | None = None,
    ) -> list[str]:
        """DeleteMessage: the message (and, ``with_later``, every later one on
        ``branch``, 0: the active one) deleted; the names deleted. The log keeps a
        tombstone of each (MESSAGE_DELETED), never its words."""
        response = await self.context.DeleteMessage(
            context_pb2.DeleteMessageRequest(name=message, with_later=with_later, branch=branch),
            timeout=timeout_s,
        )
        return list(response.deleted)

    async def get_run(self, run: RunLike, *, timeout_s: float | None = None) -> dispatcher_pb2.Run:
        """The run as it stands now (``GetRun``): its state, usage and, for a child
        run, its ``parent``, ``parent_tool_call`` and ``depth``."""
        response = await self.dispatcher.GetRun(
            dispatcher_pb2.GetRunRequest(name=run_name(run)), timeout=timeout_s
        )
        return response.run

    async def children(
        self, run: RunLike, *, limit: int = 1000, timeout_s: float | None = None
    ) -> list[dispatcher_pb2.Run]:
        """The child runs of ``run``: the runs its delegate tool calls started
        (docs/delegation.md), newest first, every page up to ``limit``. Each one's
        ``parent`` is ``run``, its ``parent_tool_call`` the call it answers, and it
        lives in a conversation of its own (``ListRuns`` with ``parent_run``, over
        the run's workspace). ``timeout_s`` bounds each page's call. A name that is
        not a run's raises ValueError before anything is sent."""
        name = run_name(run)
        workspace = run_workspace(name)
        found: list[dispatcher_pb2.Run] = []
        token = ""
        while len(found) < limit:
            response = await self.dispatcher.ListRuns(
                dispatcher_pb2.ListRunsRequest(
                    parent=workspace,
                    parent_run=name,
                    page_size=min(100, limit - len(found)),
                    page_token=token,
                ),
                timeout=timeout_s,
            )
            found += response.runs
            token = response.next_page_token
            if not token:
                break
        return found[:limit]

    async def tree(self, run: RunLike, *, timeout_s: float | None = None) -> RunTree:
        """``run`` with its children, theirs below them, and so on (``GetRun``, then
        ``children`` of each run). The server bounds a tree's depth and size
        (SWITCHBOARD_DISPATCHER_MAX_DELEGATION_DEPTH and _MAX_CHILDREN_PER_TREE), so
        this makes at most one call per run of the tree, plus one."""
        root = await self.get_run(run, timeout_s=timeout_s)
        return await self._subtree(root, timeout_s)

    async def _subtree(self, run: dispatcher_pb2.Run, timeout_s: float | None) -> RunTree:
        below = await self.children(run.name, timeout_s=timeout_s)
        return RunTree(run, [await self._subtree(child, timeout_s) for child in below])

    async def cancel(self, run: RunLike, reason: str = "") -> dispatcher_pb2.Run:
        """Cancel a run (its handler is stopped, and so are its children that are
        still going); the run as it ended."""
        response = await self.dispatcher.CancelRun(
            dispatcher_pb2.CancelRunRequest(name=run_name(run), reason=reason)
        )
        return response.run

    async def steer(
        self,
        run: str | dispatcher_pb2.Run,
        text: str,
        *,
        files: Sequence[str | context_pb2.File] = (),
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> dispatcher_pb2.SteerRunResponse:
        """Hand a user message to a run that is going (``SteerRun``), without
        cancelling it: the stored message and the steer's own run (QUEUED,
        ``steer.state`` ACCEPTED).

        Watch the steer's run to learn what became of it: SUCCEEDED with
        ``steer.state`` CONSUMED (and the ``step`` whose model call first saw the
        message) once the target took it, or REQUEUED if the target ended first,
        when it runs and answers the message itself. A run that has already
        ended raises ``RunEnded`` and stores nothing. Keyed like ``send``.
        """
        name = run if isinstance(run, str) else run.name
        request = dispatcher_pb2.SteerRunRequest(
            run=name,
            message=_user_message(text, files),
            request_id=request_id or new_request_id(),
        )
        response: dispatcher_pb2.SteerRunResponse = await self.dispatcher.SteerRun(
            request, timeout=timeout_s
        )
        return response

    # -- assistants ---------------------------------------------------------------------

    async def get_assistant(
        self, name: str, *, revision: int = 0, timeout_s: float | None = None
    ) -> dispatcher_pb2.Assistant:
        """GetAssistant: ``name`` (``workspaces/w/assistants/a``) as it is now, or as
        its kept ``revision`` configured it (``list_assistant_revisions``). An earlier
        revision comes without an ``etag``: it cannot be updated, only made current
        again (``rollback_assistant``); its ``update_time`` is when it was made. One
        the assistant does not keep is ``NotFound``."""
        response = await self.dispatcher.GetAssistant(
            dispatcher_pb2.GetAssistantRequest(name=name, revision=revision), timeout=timeout_s
        )
        return response.assistant

    async def list_assistant_revisions(
        self,
        assistant: AssistantLike,
        *,
        limit: int = 1000,
        page_size: int = DEFAULT_REVISIONS_PAGE,
        timeout_s: float | None = None,
    ) -> list[dispatcher_pb2.AssistantRevision]:
        """ListAssistantRevisions: the assistant's revisions, newest first, every page
        up to ``limit``. Each holds the whole configuration a change left
        (``.assistant``), who made it, and what did (``.origin``: a create, an update
        or a rollback, then with ``.restored_revision``). ``page_size`` revisions per
        call (the server caps it at 50, as each carries a configuration); ``timeout_s``
        bounds each call."""
        if page_size < 1:
            raise ValueError("page_size must be 1 or more")
        name, _ = _assistant_name_and_etag(assistant)
        found: list[dispatcher_pb2.AssistantRevision] = []
        token = ""
        while len(found) < limit:
            response = await self.dispatcher.ListAssistantRevisions(
                dispatcher_pb2.ListAssistantRevisionsRequest(
                    parent=name, page_size=min(page_size, limit - len(found)), page_token=token
                ),
                timeout=timeout_s,
            )
            found += response.revisions
            token = response.next_page_token
            if not token:
                break
        return found[:limit]

    async def rollback_assistant(
        self,
        assistant: AssistantLike,
        revision: int,
        *,
        etag: str = "",
        timeout_s: float | None = None,
    ) -> dispatcher_pb2.Assistant:
        """RollbackAssistant (owners only): make ``revision``'s configuration current
        again, as a new revision (origin ROLLED_BACK); the revisions between stay as
        they were, so a rollback is undone by another. Keyed by ``etag`` (an assistant
        passed as itself sends its own) so that it never overwrites a change made
        unseen: a stale one is ``EtagMismatch``. A repeat, when the configuration is
        already that revision's, makes none. A revision whose configuration names
        what has gone since (a delegate, an integration) is ``FailedPrecondition``."""
        name, own = _assistant_name_and_etag(assistant)
        response = await self.dispatcher.RollbackAssistant(
            dispatcher_pb2.RollbackAssistantRequest(name=name, revision=revision, etag=etag or own),
            timeout=timeout_s,
        )
        return response.assistant

    # -- schedules ----------------------------------------------------------------------

    async def create_schedule(
        self,
        workspace: str,
        message_template: str,
        *,
        cron: str = "",
        time_zone: str = "",
        interval_s: float | None = None,
        display_name: str = "",
        assistant: str = "",
        handler: str = "",
        conversation_mode: dispatcher_pb2.ScheduleConversationMode.ValueType = (
            dispatcher_pb2.SCHEDULE_CONVERSATION_MODE_UNSPECIFIED
        ),
        concurrency_policy: dispatcher_pb2.ConcurrencyPolicy.ValueType = (
            dispatcher_pb2.CONCURRENCY_POLICY_UNSPECIFIED
        ),
        missed_tick_policy: dispatcher_pb2.MissedTickPolicy.ValueType = (
            dispatcher_pb2.MISSED_TICK_POLICY_UNSPECIFIED
        ),
        run_timeout_s: float | None = None,
        schedule_id: str = "",
        request_id: str | None = None,
        timeout_s: float | None = None,
        assistant_revision: int = 0,
        call: tuple[str, str] | None = None,
    ) -> dispatcher_pb2.Schedule:
        """Create a schedule in ``workspace`` (``workspaces/w``): a message sent on a
        ``cron`` expression (read in ``time_zone``, UTC if empty) or every
        ``interval_s`` seconds (exactly one of the two). The server checks both
        (a cron that does not parse, an unknown zone, an interval under its
        minimum: ``InvalidArgument`` naming the field). Keyed like ``send``.
        ``assistant_revision`` pins ``assistant`` (which it needs) at that revision:
        every tick answers with that configuration, whatever changes later (0: the
        current one at each tick; change it with ``update_schedule`` of
        ``assistant_revision``). ``call`` (a trunk and a number) makes each tick place a
        phone call instead, the rendered template its opening message, answered by
        ``assistant`` (docs/telephony.md)."""
        schedule = dispatcher_pb2.Schedule(
            display_name=display_name,
            assistant=assistant,
            assistant_revision=assistant_revision,
            handler=handler_name(handler),
            message_template=message_template,
            cron=cron,
            time_zone=time_zone,
            conversation_mode=conversation_mode,
            concurrency_policy=concurrency_policy,
            missed_tick_policy=missed_tick_policy,
        )
        if interval_s is not None:
            schedule.interval.FromNanoseconds(round(interval_s * 1e9))
        if run_timeout_s is not None:
            schedule.timeout.FromNanoseconds(round(run_timeout_s * 1e9))
        if call is not None:
            schedule.call.trunk, schedule.call.to_number = call
        response = await self.dispatcher.CreateSchedule(
            dispatcher_pb2.CreateScheduleRequest(
                parent=workspace,
                schedule=schedule,
                schedule_id=schedule_id,
                request_id=request_id or new_request_id(),
            ),
            timeout=timeout_s,
        )
        return response.schedule

    async def get_schedule(self, name: str) -> dispatcher_pb2.Schedule:
        """A schedule, with its next fire times (``upcoming_fire_times``)."""
        response = await self.dispatcher.GetSchedule(dispatcher_pb2.GetScheduleRequest(name=name))
        return response.schedule

    async def list_schedules(
        self, workspace: str, *, limit: int = 1000
    ) -> list[dispatcher_pb2.Schedule]:
        """A workspace's schedules by id, every page up to ``limit``."""
        found: list[dispatcher_pb2.Schedule] = []
        token = ""
        while len(found) < limit:
            response = await self.dispatcher.ListSchedules(
                dispatcher_pb2.ListSchedulesRequest(
                    parent=workspace, page_size=min(100, limit - len(found)), page_token=token
                )
            )
            found += response.schedules
            token = response.next_page_token
            if not token:
                break
        return found[:limit]

    async def update_schedule(
        self, schedule: dispatcher_pb2.Schedule, fields: Sequence[str]
    ) -> dispatcher_pb2.Schedule:
        """Change ``fields`` of a schedule to ``schedule``'s values (its ``name``,
        and its ``etag`` if set, say which version: a stale one is
        ``EtagMismatch``); its next fire time is computed again."""
        request = dispatcher_pb2.UpdateScheduleRequest(schedule=schedule)
        request.update_mask.paths.extend(fields)
        response = await self.dispatcher.UpdateSchedule(request)
        return response.schedule

    async def pause_schedule(
        self, schedule: str | dispatcher_pb2.Schedule
    ) -> dispatcher_pb2.Schedule:
        """Pause a schedule (a ``Schedule`` sends its etag along); it fires nothing
        until resumed."""
        name, etag = _name_and_etag(schedule)
        response = await self.dispatcher.PauseSchedule(
            dispatcher_pb2.PauseScheduleRequest(name=name, etag=etag)
        )
        return response.schedule

    async def resume_schedule(
        self, schedule: str | dispatcher_pb2.Schedule
    ) -> dispatcher_pb2.Schedule:
        """Resume a paused schedule: it fires from its next tick after now (ticks
        that fell while it was paused are never fired)."""
        name, etag = _name_and_etag(schedule)
        response = await self.dispatcher.ResumeSchedule(
            dispatcher_pb2.ResumeScheduleRequest(name=name, etag=etag)
        )
        return response.schedule

    async def delete_schedule(self, schedule: str | dispatcher_pb2.Schedule) -> None:
        """Delete a schedule; the runs it started are kept."""
        name, etag = _name_and_etag(schedule)
        await self.dispatcher.DeleteSchedule(
            dispatcher_pb2.DeleteScheduleRequest(name=name, etag=etag)
        )

    async def schedule_firings(
        self, schedule: str | dispatcher_pb2.Schedule, *, limit: int = 100
    ) -> list[dispatcher_pb2.ScheduleFiring]:
        """A schedule's firings, newest tick first, up to ``limit``: each with its
        outcome and the run it started (or why it started none)."""
        name = schedule if isinstance(schedule, str) else schedule.name
        found: list[dispatcher_pb2.ScheduleFiring] = []
        token = ""
        while len(found) < limit:
            response = await self.dispatcher.ListScheduleFirings(
                dispatcher_pb2.ListScheduleFiringsRequest(
                    parent=name, page_size=min(100, limit - len(found)), page_token=token
                )
            )
            found += response.firings
            token = response.next_page_token
            if not token:
                break
        return found[:limit]

    # -- phone calls --------------------------------------------------------------------

    async def place_call(
        self,
        workspace: str,
        *,
        trunk: str,
        to_number: str,
        assistant: str,
        opening_message: str,
        ring_timeout_s: float | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> dispatcher_pb2.Call:
        """PlaceCall: call ``to_number`` (E.164, ``+`` and 8 to 15 digits) from the
        server's SIP ``trunk``, answered by ``assistant`` (of ``workspace``, with a voice),
        which says ``opening_message`` first once the line is picked up. Returns at once
        with the call DIALING; ``wait_call`` (or ``follow`` of CALL_CHANGED) sees it ring,
        be answered and end. ``ring_timeout_s``: how long it may ring (the server's 30 s
        if None; 5 to 120). Keyed like ``send``, so a retry places no second call. A
        field the server refuses (a trunk that does not call for the workspace or that
        number included) is ``InvalidArgument`` naming it; a server without SIP,
        ``FailedPrecondition``; the workspace's limit of calls at once,
        ``ResourceExhausted``."""
        request = dispatcher_pb2.PlaceCallRequest(
            parent=workspace,
            trunk=trunk,
            to_number=to_number,
            assistant=assistant,
            opening_message=opening_message,
            request_id=request_id or new_request_id(),
        )
        if ring_timeout_s is not None:
            request.ring_timeout.FromNanoseconds(round(ring_timeout_s * 1e9))
        response = await self.dispatcher.PlaceCall(request, timeout=timeout_s)
        return response.call

    async def get_call(
        self, call: CallLike, *, timeout_s: float | None = None
    ) -> dispatcher_pb2.Call:
        """GetCall: a phone call, inbound or outbound, as it stands now (a live one's
        ``duration`` so far)."""
        response = await self.dispatcher.GetCall(
            dispatcher_pb2.GetCallRequest(name=call_name(call)), timeout=timeout_s
        )
        return response.call

    async def list_calls(
        self,
        workspace: str,
        *,
        live_only: bool = False,
        limit: int = 1000,
        timeout_s: float | None = None,
    ) -> list[dispatcher_pb2.Call]:
        """ListCalls: a workspace's phone calls, newest first, every page up to
        ``limit``; ``live_only``, only those not ENDED. ``timeout_s`` bounds each page's
        call."""
        found: list[dispatcher_pb2.Call] = []
        token = ""
        while len(found) < limit:
            response = await self.dispatcher.ListCalls(
                dispatcher_pb2.ListCallsRequest(
                    parent=workspace,
                    live_only=live_only,
                    page_size=min(100, limit - len(found)),
                    page_token=token,
                ),
                timeout=timeout_s,
            )
            found += response.calls
            token = response.next_page_token
            if not token:
                break
        return found[:limit]

    async def end_call(
        self, call: CallLike, *, timeout_s: float | None = None
    ) -> dispatcher_pb2.Call:
        """EndCall: hang up a live call, wherever the server carries it; an ended call
        is returned as it is. The answer may still show the call live: the line takes
        a moment to go down over SIP (``wait_call(call, states=["ended"])`` waits for
        it); its ``end_reason`` is then ``ended by users/...``."""
        response = await self.dispatcher.EndCall(
            dispatcher_pb2.EndCallRequest(name=call_name(call)), timeout=timeout_s
        )
        return response.call

    async def wait_call(
        self,
        call: CallLike,
        *,
        states: Iterable[CallStateLike] = (dispatcher_pb2.CALL_STATE_ANSWERED,),
        timeout_s: float = DEFAULT_CALL_WAIT_S,
    ) -> dispatcher_pb2.Call:
        """Poll the call (GetCall, a bounded backoff from 0.1 s to 2 s) until it is in
        one of ``states`` (the enum or names: ``"ringing"``, ``"answered"``) or ENDED,
        after which it never changes: a call that was busy or not answered comes back
        ENDED from a wait for ANSWERED, so check its ``state``. Not there after
        ``timeout_s`` (default: longer than the longest ring timeout),
        ``DeadlineExceeded``. A ``Call`` may be followed as it changes instead:
        ``follow([workspace], types=["CALL_CHANGED"])``."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        # One name alone is one state, not its letters.
        wanted = {call_state(state) for state in ((states,) if isinstance(states, str) else states)}
        wanted.add(dispatcher_pb2.CALL_STATE_ENDED)
        name = call_name(call)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        attempt = 0
        while (left := deadline - loop.time()) > 0:
            # Each read gets what is left of the wait, so the whole stays within it.
            current = await self.get_call(name, timeout_s=left)
            if current.state in wanted:
                return current
            delay = min(CALL_POLL.delay(attempt), deadline - loop.time())
            if delay <= 0:
                break
            await asyncio.sleep(delay)
            attempt += 1
        shown = ", ".join(sorted(dispatcher_pb2.CallState.Name(s) for s in wanted))
        raise DeadlineExceeded(f"{name} reached none of {shown} within {timeout_s:g} s")

    # -- search -------------------------------------------------------------------------

    async def search_context(
        self,
        parent: str,
        query: str,
        *,
        mode: context_pb2.SearchMode.ValueType = context_pb2.SEARCH_MODE_UNSPECIFIED,
        filter: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout_s: float | None = None,
    ) -> context_pb2.SearchContextResponse:
        """Search ``parent`` (``workspaces/w``, or a conversation of it: its messages and
        memory plus the workspace's memory and documents) for ``query``. ``mode``:
        ``SEARCH_MODE_FULL_TEXT``, ``_SEMANTIC`` or ``_HYBRID`` (unset: hybrid once the
        workspace's semantic index is configured, else full-text); ``filter``: AIP-160
        comparisons joined by ``AND`` (``source = memory AND kind = fact``). Each
        result says where it came from (``memory_item``, ``message`` or
        ``document_chunk``) with its score; ``fallback_reason`` says why a semantic
        search ran full-text instead."""
        return await self.context.SearchContext(
            context_pb2.SearchContextRequest(
                parent=parent,
                query=query,
                mode=mode,
                filter=filter,
                page_size=page_size,
                page_token=page_token,
            ),
            timeout=timeout_s,
        )

    async def search_memory(
        self,
        parent: str,
        query: str,
        *,
        mode: context_pb2.SearchMode.ValueType = context_pb2.SEARCH_MODE_UNSPECIFIED,
        filter: str = "",
        page_size: int = 0,
        workspace: str = "",
        timeout_s: float | None = None,
    ) -> context_pb2.SearchMemoryItemsResponse:
        """SearchMemoryItems: current memory items of ``parent`` (a workspace,
        conversation or ``users/me``) matching ``query``, ranked in ``mode`` with their
        scores. ``workspace`` (``workspaces/w``), in a user's scope: only what was formed
        in that workspace, and what people wrote."""
        return await self.context.SearchMemoryItems(
            context_pb2.SearchMemoryItemsRequest(
                parent=parent,
                query=query,
                mode=mode,
                filter=filter,
                page_size=page_size,
                workspace=workspace,
            ),
            timeout=timeout_s,
        )

    async def get_semantic_index(self, workspace: str) -> context_pb2.SemanticIndex:
        """``workspace``'s semantic index: its model, dimensions, what it indexes, and
        its state (how far the background indexer is)."""
        response = await self.context.GetSemanticIndex(
            context_pb2.GetSemanticIndexRequest(name=f"{workspace}/semanticIndex")
        )
        return response.semantic_index

    async def update_semantic_index(
        self, index: context_pb2.SemanticIndex, fields: Sequence[str]
    ) -> context_pb2.SemanticIndex:
        """Change ``fields`` of a workspace's semantic index to ``index``'s values (its
        ``name`` says which: ``workspaces/w/semanticIndex``); a new model re-embeds in
        the background. Owners only."""
        request = context_pb2.UpdateSemanticIndexRequest(semantic_index=index)
        request.update_mask.paths.extend(fields)
        response = await self.context.UpdateSemanticIndex(request)
        return response.semantic_index

    # -- memory -------------------------------------------------------------------------

    async def remember(
        self,
        parent: str,
        content: str,
        *,
        kind: int | str = context_pb2.MEMORY_KIND_FACT,
        supersedes: str = "",
        valid_time: dt.datetime | None = None,
        pinned: bool = False,
        expire_time: dt.datetime | None = None,
        metadata: Mapping[str, Any] | None = None,
        memory_item_id: str = "",
        timeout_s: float | None = None,
    ) -> context_pb2.MemoryItem:
        """CreateMemoryItem: ``content`` remembered in ``parent`` (``users/u``,
        ``workspaces/w`` or a conversation of it) as a ``kind`` (``"fact"``,
        ``"preference"``, ``"plan"``, ``"note"`` or the enum). ``supersedes`` names an
        item of the same parent that this one replaces: it is retired at this one's
        ``valid_time`` (when what it says became true; now if unset) in the same
        transaction, and a retired one is ``FailedPrecondition``. ``memory_item_id``
        makes a retried create apply once (the second is ``AlreadyExists``)."""
        item = context_pb2.MemoryItem(
            kind=memory_kind(kind), content=content, pinned=pinned, supersedes=supersedes
        )
        if valid_time is not None:
            item.valid_time.CopyFrom(timestamp(valid_time))
        if expire_time is not None:
            item.expire_time.CopyFrom(timestamp(expire_time))
        if metadata is not None:
            item.metadata.update(metadata)
        response = await self.context.CreateMemoryItem(
            context_pb2.CreateMemoryItemRequest(
                parent=parent, memory_item=item, memory_item_id=memory_item_id
            ),
            timeout=timeout_s,
        )
        return response.memory_item

    async def list_memory(
        self,
        parent: str,
        *,
        validity: ValidityLike = context_pb2.MEMORY_VALIDITY_CURRENT,
        valid_at: dt.datetime | None = None,
        workspace: str = "",
        kinds: Iterable[int | str] = (),
        pinned_only: bool = False,
        limit: int = 1000,
        timeout_s: float | None = None,
    ) -> list[context_pb2.MemoryItem]:
        """ListMemoryItems: ``parent``'s items, newest first, every page up to ``limit``.

        ``validity``: ``"current"`` (true now; the default), ``"retired"`` (no longer
        true: superseded, retracted, expired, merged) or ``"all"``. ``valid_at``: the
        items true at that time instead (``validity`` is then ignored). ``workspace``
        (``workspaces/w``), in a user's scope: only what was formed in that workspace,
        and what people wrote. ``timeout_s`` bounds each page."""
        request = context_pb2.ListMemoryItemsRequest(
            parent=parent,
            kinds=[memory_kind(k) for k in kinds],
            pinned_only=pinned_only,
            validity=memory_validity(validity),
            workspace=workspace,
        )
        if valid_at is not None:
            request.valid_at.CopyFrom(timestamp(valid_at))
        found: list[context_pb2.MemoryItem] = []
        while len(found) < limit:
            request.page_size = min(100, limit - len(found))
            response = await self.context.ListMemoryItems(request, timeout=timeout_s)
            found += response.memory_items
            request.page_token = response.next_page_token
            if not request.page_token:
                break
        return found[:limit]

    async def get_memory(
        self, item: MemoryLike, *, history: bool = False, timeout_s: float | None = None
    ) -> context_pb2.GetMemoryItemResponse:
        """GetMemoryItem: the item (``.memory_item``), and with ``history`` every version
        of it and of the items it superseded, oldest first (``.history``: each
        ``MemoryItemVersion`` with its change, content, editor, and validity then)."""
        name, _ = name_and_etag(item)
        return await self.context.GetMemoryItem(
            context_pb2.GetMemoryItemRequest(name=name, include_history=history),
            timeout=timeout_s,
        )

    async def _update_memory(
        self, item: context_pb2.MemoryItem, fields: Sequence[str], timeout_s: float | None
    ) -> context_pb2.MemoryItem:
        request = context_pb2.UpdateMemoryItemRequest(memory_item=item)
        request.update_mask.paths.extend(fields)
        response = await self.context.UpdateMemoryItem(request, timeout=timeout_s)
        return response.memory_item

    async def correct_memory(
        self,
        item: MemoryLike,
        content: str,
        *,
        etag: str = "",
        timeout_s: float | None = None,
    ) -> context_pb2.MemoryItem:
        """UpdateMemoryItem of ``content``: a new version in the item's history. The
        version changed is the one ``etag`` names (an item passed as itself sends its
        own): a stale one is ``EtagMismatch``, so an edit never overwrites another
        unseen. Without one, the latest version is changed."""
        name, own = name_and_etag(item)
        changed = context_pb2.MemoryItem(name=name, etag=etag or own, content=content)
        return await self._update_memory(changed, ["content"], timeout_s)

    async def retire_memory(
        self,
        item: MemoryLike,
        *,
        reason: str = "",
        at: dt.datetime | None = None,
        etag: str = "",
        timeout_s: float | None = None,
    ) -> context_pb2.MemoryItem:
        """Mark an item no longer true (``invalid_time``: ``at``, now by this client's
        clock if unset; a time in the future is refused) with ``reason`` in words (at
        most 200 characters). Nothing is deleted: it leaves the context window and the
        current list, and stays in ``list_memory(..., validity="retired")`` and its
        history until forgotten."""
        name, own = name_and_etag(item)
        retired = context_pb2.MemoryItem(name=name, etag=etag or own, invalid_reason=reason)
        retired.invalid_time.CopyFrom(timestamp(at or dt.datetime.now(dt.UTC)))
        return await self._update_memory(retired, ["invalid_time", "invalid_reason"], timeout_s)

    async def restore_memory(
        self, item: MemoryLike, *, etag: str = "", timeout_s: float | None = None
    ) -> context_pb2.MemoryItem:
        """Make a retired item current again (its ``invalid_time`` and reason cleared),
        unless a newer item superseded it (that one is ``FailedPrecondition``)."""
        name, own = name_and_etag(item)
        cleared = context_pb2.MemoryItem(name=name, etag=etag or own)
        return await self._update_memory(cleared, ["invalid_time", "invalid_reason"], timeout_s)

    async def forget_memory(self, item: MemoryLike, *, timeout_s: float | None = None) -> None:
        """DeleteMemoryItem: the item is gone for good, and so is its history: the
        items it superseded (theirs too), every version and embedding of them
        (``NotFound`` afterwards). An item that superseded it stays, current. To keep
        the record that it was once true, ``retire_memory`` instead."""
        name, _ = name_and_etag(item)
        await self.context.DeleteMemoryItem(
            context_pb2.DeleteMemoryItemRequest(name=name), timeout=timeout_s
        )

    async def set_assistant_memory_policy(
        self,
        assistant: str,
        policy: context_pb2.MemoryPolicy | None,
        *,
        etag: str = "",
        timeout_s: float | None = None,
    ) -> dispatcher_pb2.Assistant:
        """UpdateAssistant of ``memory_policy``: whether and how ``assistant``
        (``workspaces/w/assistants/a``) forms memory from its conversations. None (or a
        policy whose mode is unset) takes the workspace's. A policy the server refuses
        (an idle time, a count or a time to live out of range, a category twice) is
        ``InvalidArgument`` naming the field, and nothing changes."""
        changed = dispatcher_pb2.Assistant(name=assistant, etag=etag)
        if policy is not None:
            changed.memory_policy.CopyFrom(policy)
        request = dispatcher_pb2.UpdateAssistantRequest(assistant=changed)
        request.update_mask.paths.append("memory_policy")
        response = await self.dispatcher.UpdateAssistant(request, timeout=timeout_s)
        return response.assistant

    async def set_workspace_memory_policy(
        self,
        workspace: str,
        policy: context_pb2.MemoryPolicy | None,
        *,
        timeout_s: float | None = None,
    ) -> context_pb2.Workspace:
        """UpdateWorkspace of ``memory_policy`` (owners only): the policy of the
        workspace's assistants that set none. None turns forming off for them."""
        changed = context_pb2.Workspace(name=workspace)
        if policy is not None:
            changed.memory_policy.CopyFrom(policy)
        request = context_pb2.UpdateWorkspaceRequest(workspace=changed)
        request.update_mask.paths.append("memory_policy")
        response = await self.context.UpdateWorkspace(request, timeout=timeout_s)
        return response.workspace

    # -- files --------------------------------------------------------------------------

    async def upload_file(
        self,
        workspace: str,
        source: Source,
        *,
        display_name: str | None = None,
        media_type: str | None = None,
        resumable: bool = False,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> context_pb2.File:
        """Store a file in ``workspace``: a path, bytes or a seekable binary file.

        ``display_name`` defaults to the file's name (required for bytes),
        ``media_type`` to what the name suggests (the server checks it against the
        content). Streamed by default (one ``UploadFile`` call, no deadline unless
        ``timeout_s``); ``resumable=True`` uses the unary steps and continues after
        ``UNAVAILABLE`` from the committed size (docs/python-client.md, "Files").
        """
        request_id = request_id or new_request_id()
        if resumable:
            return await upload_resumable(
                self.context,
                workspace,
                source,
                display_name=display_name,
                media_type=media_type,
                request_id=request_id,
                policy=self._transfers,
            )
        return await upload_streamed(
            self.context,
            workspace,
            source,
            display_name=display_name,
            media_type=media_type,
            request_id=request_id,
            timeout_s=timeout_s,
        )

    async def download_file(self, name: str, destination: Destination) -> context_pb2.File:
        """Write a stored file's bytes to ``destination`` (a path or a binary file),
        resuming at the offset reached after a dropped stream; the file's metadata.
        Raises ``DataLoss`` if what arrived does not have the file's size and SHA-256."""
        return await download(self.context, name, destination, policy=self._transfers)

    # -- your data ----------------------------------------------------------------------

    async def owned_alone(self, *, timeout_s: float | None = None) -> list[str]:
        """The workspaces you own with no other owner: each must be named when you
        delete your account (``delete_my_account``'s ``delete`` or ``hand_over``)."""
        return await account.owned_alone(self.auth, self.context, timeout_s)

    async def delete_my_account(
        self,
        confirm_email: str,
        *,
        delete: Iterable[str] = (),
        hand_over: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> auth_pb2.Erasure:
        """DeleteMyAccount (a signed-in session's, not an API key's): the account is
        deleted and its data erased in the background; the ``Erasure`` under way.

        ``confirm_email`` is the account's email (compared case-insensitively; another
        is ``InvalidArgument`` on ``confirm_email``). Every workspace you own with no
        other owner (``owned_alone``) must be named: in ``delete`` (``workspaces/w``:
        gone at once, with everything in it) or in ``hand_over``, mapped to the member
        who becomes its owner (``users/u``). One left out is ``FailedPrecondition``
        naming it; one you do not own alone, or a new owner who is not a member, is
        ``InvalidArgument`` on ``workspaces[i]...``. Afterwards every credential of
        yours is refused, so this client forgets its tokens (as ``sign_out`` does)."""
        request = auth_pb2.DeleteMyAccountRequest(
            confirm_email=confirm_email,
            workspaces=account.owned_workspaces(delete, hand_over or {}),
        )
        response = await self.auth.DeleteMyAccount(request, timeout=timeout_s)
        await self.tokens.signed_out()
        return response.erasure

    async def export_my_data(
        self, request_id: str | None = None, *, timeout_s: float | None = None
    ) -> context_pb2.DataExport:
        """ExportMyData: start writing one archive of your data (RUNNING; while one
        runs, asking again returns it). At most 5 a day (``ResourceExhausted``). Keyed
        like ``send``, so a retry returns the same export; ``wait_for_export`` waits
        for it, ``download_export`` fetches it."""
        response = await self.context.ExportMyData(
            context_pb2.ExportMyDataRequest(request_id=request_id or new_request_id()),
            timeout=timeout_s,
        )
        return response.export

    async def data_export(
        self, export: ExportLike, *, timeout_s: float | None = None
    ) -> context_pb2.DataExport:
        """GetDataExport: an export of yours (``users/u/exports/e``) as it stands now."""
        response = await self.context.GetDataExport(
            context_pb2.GetDataExportRequest(name=export_name(export)), timeout=timeout_s
        )
        return response.export

    async def wait_for_export(
        self, export: ExportLike, *, timeout_s: float = DEFAULT_EXPORT_WAIT_S
    ) -> context_pb2.DataExport:
        """Poll the export (a bounded backoff, from 0.1 s to 3 s) until it SUCCEEDED;
        the export, with its size, SHA-256 and ``expire_time``. A FAILED one raises
        the error it carries (``ResourceExhausted`` past the size limit); still
        running after ``timeout_s``, ``DeadlineExceeded``."""
        return await account.wait_for_export(self.context, export, timeout_s=timeout_s)

    async def download_export(
        self, export: ExportLike, destination: Destination
    ) -> context_pb2.File:
        """Write a finished export's archive (a ZIP) to ``destination`` (a path or a
        binary file), resumed after a dropped stream; the archive's metadata. Raises
        ``DataLoss`` unless what arrived has the export's size and SHA-256 (an export
        given by name is read first for them)."""
        current = export if isinstance(export, context_pb2.DataExport) else None
        if current is None or not current.sha256:
            current = await self.data_export(export)
        file = await download(self.context, current.name, destination, policy=self._transfers)
        if (file.sha256, file.size_bytes) != (current.sha256, current.size_bytes):
            raise DataLoss(
                f"{current.name}: the archive sent ({file.size_bytes} bytes, {file.sha256}) "
                f"is not the export's ({current.size_bytes} bytes, {current.sha256})"
            )
        return file

    # -- voice --------------------------------------------------------------------------

    def talk(
        self,
        conversation: str,
        *,
        assistant: str = "",
        input_rate_hz: int = 16_000,
        output_rate_hz: int = 24_000,
        turn_detection: TurnDetectionLike = dispatcher_pb2.TURN_DETECTION_SERVER_VAD,
        silence_s: float | None = None,
        barge_in: bool = False,
        partial_transcripts: bool = False,
        concurrency_policy: dispatcher_pb2.ConcurrencyPolicy.ValueType = (
            dispatcher_pb2.CONCURRENCY_POLICY_UNSPECIFIED
        ),
        max_frame_bytes: int = MAX_FRAME_BYTES,
        resend_lost: bool = True,
        on_resume: OnResume | None = None,
        turn_detector: TurnDetectorLike = dispatcher_pb2.TURN_DETECTOR_UNSPECIFIED,
        turn_eagerness: TurnEagernessLike = dispatcher_pb2.TURN_EAGERNESS_UNSPECIFIED,
        assistant_revision: int = 0,
    ) -> TalkSession:
        """A voice session on ``conversation`` (``Talk``), resumed across dropped
        connections; open it with ``async with``.

        Audio goes in as 16-bit mono PCM at ``input_rate_hz``, speech comes back at
        ``output_rate_hz`` (8000, 16000, 24000 or 48000). ``turn_detection``
        ``"client"``: only ``end_turn`` ends a turn; ``"server_vad"`` (the default):
        the server ends it after ``silence_s`` of silence too. ``barge_in``: the
        user's speech stops the assistant's. ``max_frame_bytes`` is the server's
        frame limit (SWITCHBOARD_VOICE_MAX_FRAME_BYTES). After a resume the session
        sends the turns the server lost again unless ``resend_lost`` is False (then
        ``resend`` them); ``on_resume`` hears of each resume (docs/voice.md).
        ``turn_detector`` (``"smart_turn"`` or ``"silence"``) and ``turn_eagerness``
        (``"low"``, ``"medium"``, ``"high"``): how the server decides a turn is over;
        the assistant's own settings when unset. ``assistant_revision``: the whole
        session answers with that revision of ``assistant`` (docs/assistants.md,
        "Revisions"), resumes included.
        """
        start = talk_start(
            conversation,
            assistant=assistant,
            input_rate_hz=input_rate_hz,
            output_rate_hz=output_rate_hz,
            turn_detection=turn_detection,
            silence_s=silence_s,
            barge_in=barge_in,
            partial_transcripts=partial_transcripts,
            concurrency_policy=concurrency_policy,
            turn_detector=turn_detector,
            turn_eagerness=turn_eagerness,
            assistant_revision=assistant_revision,
        )
        return TalkSession(
            self.dispatcher,
            self.tokens,
            start=start,
            policy=self._streams,
            max_frame_bytes=max_frame_bytes,
            resend_lost=resend_lost,
            on_resume=on_resume,
        )

    def resume_talk(
        self,
        session: str,
        *,
        after_sequence: int,
        turn_detection: TurnDetectionLike = dispatcher_pb2.TURN_DETECTION_SERVER_VAD,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        on_resume: OnResume | None = None,
    ) -> TalkSession:
        """Continue a voice session another ``TalkSession`` (or process) left,
        after the last numbered frame it received (its ``last_sequence``), within
        the server's resume window (else ``SessionEnded``)."""
        return TalkSession(
            self.dispatcher,
            self.tokens,
            resume=dispatcher_pb2.TalkResume(session=session, after_sequence=after_sequence),
            turn_detection=turn_detection,
            policy=self._streams,
            max_frame_bytes=max_frame_bytes,
            on_resume=on_resume,
        )

    # -- events -------------------------------------------------------------------------

    def follow(
        self,
        scopes: Iterable[ScopeLike],
        *,
        after_cursor: str = "",
        types: Iterable[TypeLike] = (),
        merge_deltas: bool = True,
    ) -> Follower:
        """Events of ``scopes`` (``users/u``, ``workspaces/w``, ``.../conversations/c``)
        after ``after_cursor`` ('' for from now on), resumed across breaks.

        ``types`` keeps only those event types (``"MESSAGE_CREATED"`` or the enum).
        The follower's ``cursor`` is where it stands; persist it to continue there.
        ``merge_deltas``: a run's consecutive text deltas delivered together come as
        one RUN_UPDATED event (its update's ``first_sequence`` .. ``sequence``).
        """
        return Follower(
            self.events,
            self.tokens,
            scopes,
            after_cursor=after_cursor,
            types=types,
            policy=self._streams,
            merge_deltas=merge_deltas,
        )

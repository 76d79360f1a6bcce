"""Loss of access reaches every open stream: the matrix of streaming RPCs x ways to lose it.

Each streaming RPC (Subscribe; Stream with a live subscription and with a new
AddSubscription; WatchRun; Converse with a live relay and with a new action)
is opened by a member of a workspace, who then loses access in one of the
ways a deployment knows: logging out, another session revoking this one or
all others, the API key being revoked, the access token running out, being
removed from the workspace, the workspace being deleted, or (where a role
matters) being lowered to viewer. Each stream must end (or answer) with the
status a unary call would get at that moment, and nothing produced after the
loss may reach the client.

The periodic re-check is set to an hour, so a stream that ends within the
read deadline (seconds) was ended by the change itself, not by the timer. A
credential runs out when the test moves the process's clock past its expiry
(``AheadClock``), not after seconds of waiting for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.context.v1 import context_pb2 as cpb
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.auth.accounts import Accounts, ClientContext
from switchboard.auth.store import AuthStore
from switchboard.dispatcher.service import Dispatcher
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.credentials.accesstokens import AccessTokens, TokenPolicy
from switchboard.platform.security.policy import AuthMethod
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, built, make_settings
from tests.kits.authkit import bearer, reason, unique_email
from tests.kits.contextkit import (
    Caller,
    add_member,
    context_stub,
    create_conversation,
    create_workspace,
    mask,
    new_caller,
)
from tests.kits.dispatchkit import dispatcher_stub, request, send
from tests.kits.eventkit import Subscriber, ids, publish, workspace_event, ws

pytestmark = [pytest.mark.service, pytest.mark.asyncio]

# What read() returns once a stream has ended (not in the type stubs).
_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009

#: The credential of an "expiry" case stops holding this long after it is issued: the
#: process's clock stands still until the test moves it, unless the real one gets there
#: first, so this is how long the stream has to open on a machine at full load.
EXPIRES_IN_S = 10
#: While the stream opens the clock stands this short of the expiry: the stream's expiry
#: timer (armed for this long) keeps finding the credential good until the test moves
#: the clock past it, then ends the stream within this much real time.
BEFORE_EXPIRY_S = 0.5
#: A run that keeps producing deltas for the whole test: 3,000 words, 20 ms apart.
STEADY = " ".join(["w"] * 3000)
STEADY_DELAY_MS = 20

SESSION_REVOKED = "ERROR_REASON_SESSION_REVOKED"
UNAUTHENTICATED = "ERROR_REASON_UNAUTHENTICATED"
TOKEN_EXPIRED = "ERROR_REASON_TOKEN_EXPIRED"
NOT_FOUND = "ERROR_REASON_NOT_FOUND"

#: Ways to lose the credential: the status (and ErrorInfo reason) a unary call then gets.
CREDENTIAL_LOSSES = {
    "logout": SESSION_REVOKED,
    "revoke_session": SESSION_REVOKED,
    "revoke_all_sessions": SESSION_REVOKED,
    "api_key_revoked": UNAUTHENTICATED,
    "api_key_expired": UNAUTHENTICATED,
    "token_expired": TOKEN_EXPIRED,
}
#: Ways to lose access to the workspace (the credential stays good): NOT_FOUND, as for a unary call.
MEMBERSHIP_LOSSES = ("member_removed", "workspace_deleted")
LOSSES = (*CREDENTIAL_LOSSES, *MEMBERSHIP_LOSSES)


@pytest.fixture
def settings() -> Settings:
    return make_settings(
        events_reauthorize_s=3600,
        events_heartbeat_s=3600,
        dispatcher_heartbeat_s=3600,
    )


class AheadClock:
    """The real clock (epoch seconds), or the later instant a test moved it to.

    Never behind the real one, so every other credential (issued on the real clock)
    reads as it would; the expiry cases move it ahead to the instant their credential
    runs out, as waiting for it would.
    """

    def __init__(self) -> None:
        self.at = 0.0

    def __call__(self) -> float:
        return max(time.time(), self.at)


@dataclass
class Scene:
    """A workspace with a conversation, its owner, and the member who will lose access."""

    mesh: SwitchboardServer
    channel: aio.Channel
    owner: Caller
    workspace: str
    conversation: str
    victim_id: str
    #: The victim's credential the stream is opened with (token or API key).
    credential: str
    #: The credential's session (empty for an API key).
    session: str
    #: Another session of the victim, which does the revoking.
    admin: str
    api_key: str
    loss: str
    #: What the authenticator and the streams' access watch read the time from.
    clock: AheadClock
    #: When the credential of an expiry case stops holding (epoch seconds); 0 otherwise.
    until: float = 0.0

    @property
    def expires(self) -> bool:
        """Whether the loss is the credential running out (no call marks its moment)."""
        return self.loss in ("token_expired", "api_key_expired")

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.credential)

    @property
    def member(self) -> str:
        return f"{self.workspace}/members/{self.victim_id}"

    def auth(self) -> Any:
        return auth_pb2_grpc.AuthServiceStub(self.channel)

    async def lose(self) -> None:
        """Take the victim's access away in the way this case names."""
        auth, context = self.auth(), context_stub(self.channel)
        admin, owner = bearer(self.admin), self.owner.md
        if self.loss == "logout":
            await auth.Logout(auth_pb2.LogoutRequest(), metadata=self.md, timeout=CALL_DEADLINE_S)
        elif self.loss == "revoke_session":
            await auth.RevokeSession(
                auth_pb2.RevokeSessionRequest(name=self.session),
                metadata=admin,
                timeout=CALL_DEADLINE_S,
            )
        elif self.loss == "revoke_all_sessions":
            await auth.RevokeAllSessions(
                auth_pb2.RevokeAllSessionsRequest(keep_current=True),
                metadata=admin,
                timeout=CALL_DEADLINE_S,
            )
        elif self.loss == "api_key_revoked":
            await auth.RevokeApiKey(
                auth_pb2.RevokeApiKeyRequest(name=self.api_key),
                metadata=admin,
                timeout=CALL_DEADLINE_S,
            )
        elif self.loss in ("token_expired", "api_key_expired"):
            await self.expired()
        elif self.loss == "member_removed":
            await context.RemoveWorkspaceMember(
                cpb.RemoveWorkspaceMemberRequest(name=self.member),
                metadata=owner,
                timeout=CALL_DEADLINE_S,
            )
        elif self.loss == "workspace_deleted":
            await context.DeleteWorkspace(
                cpb.DeleteWorkspaceRequest(name=self.workspace),
                metadata=owner,
                timeout=CALL_DEADLINE_S,
            )
        elif self.loss == "role_lowered":
            await context.UpdateWorkspaceMember(
                cpb.UpdateWorkspaceMemberRequest(
                    member=cpb.WorkspaceMember(name=self.member, role=cpb.WORKSPACE_ROLE_VIEWER),
                    update_mask=mask("role"),
                ),
                metadata=owner,
                timeout=CALL_DEADLINE_S,
            )
        else:
            raise AssertionError(self.loss)

    async def expired(self) -> None:
        """Move the clock to the credential's expiry, and wait (polling a unary call, with a
        deadline) until the credential no longer works."""
        self.clock.at = self.until
        async with asyncio.timeout(CALL_DEADLINE_S):
            # Polling a unary call: the server offers no signal for "expired".
            while await self._works():  # noqa: ASYNC110
                await asyncio.sleep(0.1)

    async def _works(self) -> bool:
        try:
            await self.auth().GetPrincipal(
                auth_pb2.GetPrincipalRequest(), metadata=self.md, timeout=CALL_DEADLINE_S
            )
        except aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            return False
        return True

    def last_sequence(self, run: str) -> int:
        """The newest update the run has produced so far (read from the process itself)."""
        feed = built(self.mesh, Dispatcher)._feeds.get(run)
        assert feed is not None
        return int(feed.last)


@pytest.fixture
async def scene(
    request: pytest.FixtureRequest, mesh: SwitchboardServer, channel: aio.Channel
) -> Scene:
    loss: str = request.param
    context = context_stub(channel)
    owner = await new_caller(mesh)
    workspace = (await create_workspace(context, owner, "Access")).name
    conversation = (await create_conversation(context, owner, workspace)).name
    store = AuthStore(mesh.shared.database)
    user = await store.create_user(unique_email("victim"), "Victim", None)
    accounts = built(mesh, Accounts)
    client = ClientContext(address="127.0.0.1")
    stream_in = await accounts.start_session(user, AuthMethod.PASSWORD, client)
    admin_in = await accounts.start_session(user, AuthMethod.PASSWORD, client)
    victim = Caller(user.id, stream_in.tokens.access_token)
    await add_member(context, owner, workspace, victim, cpb.WORKSPACE_ROLE_EDITOR)
    session = f"users/{user.id}/sessions/{stream_in.session.id}"
    credential, api_key, until = stream_in.tokens.access_token, "", 0.0
    if loss in ("api_key_revoked", "api_key_expired"):
        key = auth_pb2.CreateApiKeyRequest(display_name="stream", scopes=["read", "write"])
        if loss == "api_key_expired":
            key.expire_time.FromSeconds(int(time.time()) + EXPIRES_IN_S)
            until = float(key.expire_time.seconds)
        created = await auth_pb2_grpc.AuthServiceStub(channel).CreateApiKey(
            key, metadata=bearer(admin_in.tokens.access_token), timeout=CALL_DEADLINE_S
        )
        credential, api_key, session = created.secret, created.api_key.name, ""
    elif loss == "token_expired":
        settings = mesh.shared.settings
        short = AccessTokens(
            mesh.shared.keys,
            TokenPolicy(settings.auth_issuer, settings.auth_audience, access_ttl_s=1),
        )
        leeway = short.policy.leeway_s
        # Issued in the past, so that (with the verifier's leeway) it stops
        # verifying EXPIRES_IN_S from now.
        credential, claims = short.issue(
            subject=user.id,
            session=stream_in.session.id,
            scopes=["read", "write", "manage"],
            now=time.time() - leeway - 1 + EXPIRES_IN_S,
        )
        until = float(claims.expires_at + leeway)
    clock = AheadClock()
    mesh.shared.authenticator.clock = clock
    mesh.shared.access.clock = clock
    if until:
        clock.at = until - BEFORE_EXPIRY_S
    return Scene(
        mesh=mesh,
        channel=channel,
        owner=owner,
        workspace=workspace,
        conversation=conversation,
        victim_id=user.id,
        credential=credential,
        session=session,
        admin=admin_in.tokens.access_token,
        api_key=api_key,
        loss=loss,
        clock=clock,
        until=until,
    )


def _expected(loss: str) -> tuple[grpc.StatusCode, str]:
    if loss in CREDENTIAL_LOSSES:
        return grpc.StatusCode.UNAUTHENTICATED, CREDENTIAL_LOSSES[loss]
    return grpc.StatusCode.NOT_FOUND, NOT_FOUND


def _frame_reason(status: status_pb2.Status) -> str:
    info = error_details_pb2.ErrorInfo()
    for packed in status.details:
        if packed.Unpack(info):
            return str(info.reason)
    raise AssertionError("no ErrorInfo in the error frame")


def _frame_request_id(status: status_pb2.Status) -> str:
    info = error_details_pb2.ErrorInfo()
    for packed in status.details:
        if packed.Unpack(info):
            return str(info.metadata.get("request_id", ""))
    raise AssertionError("no ErrorInfo in the error frame")


class Duplex:
    """A bidirectional call: commands in through a queue, frames out with a deadline."""

    def __init__(self, open_call: Any, md: tuple[tuple[str, str], ...]) -> None:
        self._outgoing: asyncio.Queue[Any] = asyncio.Queue()
        self.call: Any = open_call(self._requests(), metadata=md)

    async def _requests(self) -> AsyncIterator[Any]:
        while (item := await self._outgoing.get()) is not None:
            yield item

    def send(self, message: Any) -> None:
        self._outgoing.put_nowait(message)

    def close(self) -> None:
        self._outgoing.put_nowait(None)

    async def read(self) -> Any:
        """The next frame; raises AioRpcError if the stream failed, AssertionError at its end."""
        async with asyncio.timeout(CALL_DEADLINE_S):
            frame = await self.call.read()
        assert frame is not _EOF, "the stream ended"
        return frame

    async def rest(self) -> list[Any]:
        """The frames up to a clean end (heartbeats left out)."""
        frames = []
        async with asyncio.timeout(CALL_DEADLINE_S):
            while (frame := await self.call.read()) is not _EOF:
                if frame.WhichOneof("frame") != "heartbeat":
                    frames.append(frame)
        return frames

    async def until(self, wanted: Callable[[Any], bool], frames: list[Any] | None = None) -> Any:
        """Read until a ``wanted`` frame (the others go to ``frames``), in one deadline."""
        async with asyncio.timeout(CALL_DEADLINE_S):
            while not wanted(frame := await self.read()):
                if frames is not None:
                    frames.append(frame)
        return frame

    async def error(self, frames: list[Any]) -> aio.AioRpcError:
        """Read (collecting frames) until the stream fails, in one deadline; returns the failure."""
        try:
            await self.until(lambda _: False, frames)
        except aio.AioRpcError as exc:
            return exc
        raise AssertionError("unreachable")


def _assert_status(error: aio.AioRpcError, loss: str) -> None:
    code, why = _expected(loss)
    assert error.code() == code, (loss, error.code(), error.details())
    assert reason(error) == why, loss


# -- Subscribe -------------------------------------------------------------------------------


@pytest.mark.parametrize("scene", LOSSES, indirect=True)
async def test_subscribe_ends_with_the_status_and_nothing_after_the_loss(scene: Scene) -> None:
    sub = Subscriber(scene.channel, scene.credential, scopes=[ws(scene.workspace.split("/")[1])])
    await sub.live()
    workspace_id = scene.workspace.split("/")[1]
    (before,) = await publish(scene.mesh, [workspace_event(workspace_id, note="before")])
    await sub.until(1)
    await scene.lose()
    await publish(scene.mesh, [workspace_event(workspace_id, note="after")])
    error = await sub.error()
    _assert_status(error, scene.loss)
    # Whatever the loss itself published (a deleted workspace's event) may precede the
    # end; the event published after it never arrives.
    assert before.id in ids(sub.events)
    assert "after" not in [e.actor.name for e in sub.events]


# -- Stream ----------------------------------------------------------------------------------


def _stream(scene: Scene) -> Duplex:
    return Duplex(events_pb2_grpc.EventServiceStub(scene.channel).Stream, scene.md)


@pytest.mark.parametrize("scene", LOSSES, indirect=True)
async def test_stream_subscription_ends_with_the_status(scene: Scene) -> None:
    workspace_id = scene.workspace.split("/")[1]
    stream = _stream(scene)
    stream.send(
        events_pb2.StreamRequest(
            add=events_pb2.AddSubscription(subscription_id="s", scopes=[ws(workspace_id)])
        )
    )
    assert (await stream.read()).added.subscription_id == "s"
    await scene.lose()
    await publish(scene.mesh, [workspace_event(workspace_id, note="after")])
    frames: list[events_pb2.StreamResponse] = []
    if scene.loss in CREDENTIAL_LOSSES:
        # A lost credential ends the whole stream.
        _assert_status(await stream.error(frames), scene.loss)
    else:
        # A lost scope ends that subscription; the stream goes on.
        frame = await stream.until(lambda f: f.HasField("ended"), frames)
        assert frame.ended.subscription_id == "s"
        assert frame.ended.code == grpc.StatusCode.NOT_FOUND.value[0]
        stream.send(events_pb2.StreamRequest(ping=events_pb2.Ping(nonce="alive")))
        assert (await stream.read()).pong.nonce == "alive"
        stream.close()
    delivered = [
        e.actor.name for f in frames if f.HasField("events") for e in f.events.batch.events
    ]
    assert "after" not in delivered


@pytest.mark.parametrize("scene", LOSSES, indirect=True)
async def test_stream_add_subscription_after_the_loss_is_refused(scene: Scene) -> None:
    workspace_id = scene.workspace.split("/")[1]
    stream = _stream(scene)
    stream.send(events_pb2.StreamRequest(ping=events_pb2.Ping(nonce="open")))
    assert (await stream.read()).pong.nonce == "open"
    await scene.lose()
    stream.send(
        events_pb2.StreamRequest(
            add=events_pb2.AddSubscription(subscription_id="late", scopes=[ws(workspace_id)])
        )
    )
    frames: list[events_pb2.StreamResponse] = []
    if scene.loss in CREDENTIAL_LOSSES:
        _assert_status(await stream.error(frames), scene.loss)
        assert not [f for f in frames if f.HasField("added")], "the subscription was added"
    else:
        frame = await stream.read()
        assert frame.ended.subscription_id == "late"
        assert frame.ended.code == grpc.StatusCode.NOT_FOUND.value[0]
        stream.close()


# -- WatchRun --------------------------------------------------------------------------------


async def _steady_run(scene: Scene) -> str:
    """A run (sent by the owner) that produces deltas for longer than any test."""
    sent = await send(
        dispatcher_stub(scene.channel),
        scene.owner,
        request(scene.conversation, STEADY, delay_ms=STEADY_DELAY_MS),
    )
    return sent.run.name


async def _cancel(scene: Scene, run: str) -> None:
    """Stop the run (a deleted workspace's runs stop with the mesh instead)."""
    if scene.loss == "workspace_deleted":
        return
    await dispatcher_stub(scene.channel).CancelRun(
        pb.CancelRunRequest(name=run), metadata=scene.owner.md, timeout=CALL_DEADLINE_S
    )


async def _failure(call: Any, seen: list[pb.RunUpdate]) -> aio.AioRpcError:
    """Read a WatchRun (collecting updates) until it fails; returns the failure."""
    try:
        async with asyncio.timeout(CALL_DEADLINE_S):
            while True:
                frame = await call.read()
                assert frame is not _EOF, "the stream ended without an error"
                if frame.HasField("update"):
                    seen.append(frame.update)
    except aio.AioRpcError as exc:
        return exc


@pytest.mark.parametrize("scene", LOSSES, indirect=True)
async def test_watch_run_ends_with_the_status_and_no_later_delta(scene: Scene) -> None:
    run = await _steady_run(scene)
    call: Any = dispatcher_stub(scene.channel).WatchRun(
        pb.WatchRunRequest(name=run), metadata=scene.md
    )
    seen: list[pb.RunUpdate] = []
    try:
        async with asyncio.timeout(CALL_DEADLINE_S):
            while len([u for u in seen if u.HasField("delta")]) < 2:
                frame = await call.read()
                assert frame is not _EOF
                if frame.HasField("update"):
                    seen.append(frame.update)
        await scene.lose()
        mark = scene.last_sequence(run)
        error = await _failure(call, seen)
        _assert_status(error, scene.loss)
        if not scene.expires:  # expiry has no "moment of the call" to compare with
            assert max(u.sequence for u in seen) <= mark, "a delta produced after the loss"
    finally:
        call.cancel()
        await _cancel(scene, run)


@pytest.mark.parametrize("scene", LOSSES, indirect=True)
async def test_an_idle_watch_run_ends_with_the_status_when_access_is_lost(scene: Scene) -> None:
    """The run sends nothing for a minute after its first word and heartbeats are an hour
    apart: only the loss itself can end the watch while it waits."""
    sent = await send(
        dispatcher_stub(scene.channel),
        scene.owner,
        request(scene.conversation, "first last", delay_ms=60_000),
    )
    run = sent.run.name
    call: Any = dispatcher_stub(scene.channel).WatchRun(
        pb.WatchRunRequest(name=run), metadata=scene.md
    )
    seen: list[pb.RunUpdate] = []
    try:
        async with asyncio.timeout(CALL_DEADLINE_S):
            while not any(u.HasField("delta") for u in seen):
                frame = await call.read()
                assert frame is not _EOF
                if frame.HasField("update"):
                    seen.append(frame.update)
        await scene.lose()
        error = await _failure(call, seen)
        _assert_status(error, scene.loss)
        assert [u.delta.text for u in seen if u.HasField("delta")] == ["first"]
    finally:
        call.cancel()
        await _cancel(scene, run)


# -- Converse --------------------------------------------------------------------------------


def _converse(scene: Scene, request_id: str = "") -> Duplex:
    md = scene.md + ((("x-request-id", request_id),) if request_id else ())
    return Duplex(dispatcher_stub(scene.channel).Converse, md)


@pytest.mark.parametrize("scene", [*LOSSES, "role_lowered"], indirect=True)
async def test_converse_relay_ends_with_the_status_and_no_later_delta(scene: Scene) -> None:
    converse = _converse(scene)
    converse.send(
        pb.ConverseRequest(
            client_request_id="go",
            send_message=request(scene.conversation, STEADY, delay_ms=STEADY_DELAY_MS),
        )
    )
    sent = await converse.read()
    assert sent.client_request_id == "go", sent
    run = sent.message_sent.run.name
    for _ in range(2):
        await converse.until(lambda f: f.HasField("update") and f.update.HasField("delta"))
    try:
        await scene.lose()
        mark = scene.last_sequence(run)
        frames: list[pb.ConverseResponse] = []
        if scene.loss in CREDENTIAL_LOSSES:
            # A lost credential ends the whole stream with its status.
            _assert_status(await converse.error(frames), scene.loss)
        elif scene.loss == "role_lowered":
            # A viewer may still watch: the relay carries on past the change.
            frame = await converse.until(
                lambda f: f.HasField("error") or (f.HasField("update") and f.update.sequence > mark)
            )
            assert not frame.HasField("error"), frame
            mark = 1 << 62
        else:
            # Lost access to the run's workspace ends that relay with an error frame
            # naming the run; the stream itself goes on.
            frame = await converse.until(lambda f: f.HasField("error"), frames)
            assert frame.error.code == grpc.StatusCode.NOT_FOUND.value[0]
            assert _frame_reason(frame.error) == NOT_FOUND
            assert run in frame.error.message
            converse.close()
            assert await converse.rest() == [], "the relay went on after its error"
            assert await converse.call.code() == grpc.StatusCode.OK
        updates = [f.update for f in frames if f.HasField("update")]
        if not scene.expires:
            assert all(u.sequence <= mark for u in updates), "a delta produced after the loss"
    finally:
        converse.call.cancel()
        await _cancel(scene, run)


@pytest.mark.parametrize("scene", [*LOSSES, "role_lowered"], indirect=True)
async def test_converse_action_after_the_loss_is_refused(scene: Scene) -> None:
    converse = _converse(scene)
    # An action that succeeds first: the stream is open and authorized.
    converse.send(
        pb.ConverseRequest(
            client_request_id="before",
            watch_run=pb.WatchRunRequest(name=scene.conversation + "/runs/nope"),
        )
    )
    assert (await converse.read()).client_request_id == "before"
    await scene.lose()
    converse.send(
        pb.ConverseRequest(
            client_request_id="after", send_message=request(scene.conversation, "too late")
        )
    )
    frames: list[pb.ConverseResponse] = []
    if scene.loss in CREDENTIAL_LOSSES:
        _assert_status(await converse.error(frames), scene.loss)
        assert not [f for f in frames if f.HasField("message_sent")], "the message was sent"
    else:
        frame = await converse.read()
        assert frame.client_request_id == "after"
        expected = (
            grpc.StatusCode.PERMISSION_DENIED
            if scene.loss == "role_lowered"
            else grpc.StatusCode.NOT_FOUND
        )
        assert frame.error.code == expected.value[0], frame
        converse.close()
    runs = (
        await dispatcher_stub(scene.channel).ListRuns(
            pb.ListRunsRequest(parent=scene.conversation),
            metadata=scene.owner.md,
            timeout=CALL_DEADLINE_S,
        )
        if scene.loss != "workspace_deleted"
        else None
    )
    if runs is not None:
        assert runs.runs == [], "a run was started after the loss"


# -- error frames ----------------------------------------------------------------------------


@pytest.mark.parametrize("scene", ["member_removed"], indirect=True)
async def test_converse_error_frames_carry_the_request_id(scene: Scene) -> None:
    converse = _converse(scene, request_id="req-stream-access-1")
    converse.send(pb.ConverseRequest(client_request_id="empty"))
    frame = await converse.read()
    assert frame.client_request_id == "empty"
    assert frame.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert _frame_request_id(frame.error) == "req-stream-access-1"
    # A relay's own error frame too.
    run = await _steady_run(scene)
    try:
        converse.send(
            pb.ConverseRequest(client_request_id="watch", watch_run=pb.WatchRunRequest(name=run))
        )
        await converse.until(lambda f: f.HasField("update"))
        await scene.lose()
        frame = await converse.until(lambda f: f.HasField("error"))
        assert _frame_request_id(frame.error) == "req-stream-access-1"
    finally:
        converse.call.cancel()
        await _cancel(scene, run)

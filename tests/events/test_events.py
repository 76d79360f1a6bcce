"""EventService on the embedded log: replay, live hand-over, authorization, limits, streams."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.api.events.v1 import events_pb2, events_pb2_grpc
from switchboard.mesh import create_server
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.policy import Role
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, fresh_database_url, make_settings
from tests.kits.authkit import bearer, detail, reason
from tests.kits.eventkit import (
    Commands,
    Subscriber,
    conv,
    ids,
    member,
    publish,
    user_scope,
    workspace_event,
    ws,
)

pytestmark = [pytest.mark.service, pytest.mark.asyncio]


@pytest.fixture
def settings() -> Settings:
    return make_settings(events_max_subscriptions_per_principal=8)


async def test_live_events_arrive_in_order_and_only_in_scope(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    _, token = await member(mesh, "alpha", Role.OWNER)
    await member(mesh, "beta", Role.OWNER)
    sub = Subscriber(channel, token, scopes=[ws("alpha")])
    start = await sub.live()
    published = await publish(
        mesh,
        [
            workspace_event("alpha", "c1"),
            workspace_event("beta", "c1"),  # another workspace: not delivered
            workspace_event("alpha"),
            workspace_event("alpha", "c2"),
        ],
    )
    got = await sub.until(3)
    assert ids(got) == ids([published[0], published[2], published[3]])
    assert [e.cursor for e in got] == sorted((e.cursor for e in got), key=_position)
    assert _position(got[0].cursor) > _position(start)
    assert all(e.id and e.HasField("time") for e in got)
    sub.cancel()


async def test_an_event_matching_several_scopes_is_delivered_once(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    _, token = await member(mesh, "alpha", Role.OWNER)
    sub = Subscriber(channel, token, scopes=[ws("alpha"), conv("alpha", "c1")])
    await sub.live()
    published = await publish(mesh, [workspace_event("alpha", "c1"), workspace_event("alpha")])
    assert ids(await sub.until(2)) == ids(published)
    # Nothing else is pending: the next frame after another event is that event.
    (third,) = await publish(mesh, [workspace_event("alpha", "c1")])
    assert ids(await sub.until(3))[-1] == third.id
    assert len(sub.events) == 3
    sub.cancel()


async def test_replay_then_live_with_no_gap_and_no_duplicate(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    _, token = await member(mesh, "alpha", Role.OWNER)
    before = await publish(mesh, [workspace_event("alpha", note=f"b{i}") for i in range(30)])
    # Resume after the 10th: 20 replayed, then whatever is published meanwhile arrives live.
    sub = Subscriber(channel, token, scopes=[ws("alpha")], after_cursor=before[9].cursor)
    publishing = asyncio.create_task(
        publish(mesh, [workspace_event("alpha", note=f"d{i}") for i in range(30)])
    )
    assert await sub.live() == before[9].cursor
    during = await publishing
    after = await publish(mesh, [workspace_event("alpha", note=f"a{i}") for i in range(5)])
    expected = ids(before[10:] + during + after)
    assert ids(await sub.until(len(expected))) == expected
    sub.cancel()


async def test_types_filter(mesh: SwitchboardServer, channel: aio.Channel) -> None:
    _, token = await member(mesh, "alpha", Role.OWNER)
    sub = Subscriber(
        channel, token, scopes=[ws("alpha")], types=[events_pb2.EVENT_TYPE_MESSAGE_CREATED]
    )
    await sub.live()
    published = await publish(
        mesh,
        [
            workspace_event("alpha", "c1"),
            workspace_event("alpha", "c1", events_pb2.EVENT_TYPE_MESSAGE_CREATED),
        ],
    )
    assert ids(await sub.until(1)) == [published[1].id]
    sub.cancel()


async def test_coalesces_queued_events_into_one_message(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    _, token = await member(mesh, "alpha", Role.OWNER)
    sub = Subscriber(channel, token, scopes=[ws("alpha")])
    await sub.live()
    # Published concurrently: the log commits them as one group and the
    # subscriber finds them all queued at once.
    published = await asyncio.gather(
        *(mesh.shared.bus.publish(workspace_event("alpha", note=str(i))) for i in range(50))
    )
    got = await sub.until(50)
    assert sorted(ids(got)) == sorted(ids(published))
    assert [e.cursor for e in got] == sorted((e.cursor for e in got), key=_position)
    assert sub.batches < 50, "queued events must share messages"


# -- authorization ---------------------------------------------------------------------


async def test_subscribing_needs_access_to_every_scope(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    owner_id, owner_token = await member(mesh, "alpha", Role.OWNER)
    stranger_id, stranger_token = await member(mesh, "beta", Role.OWNER)
    cases = [
        (stranger_token, [ws("alpha")]),  # not a member
        (stranger_token, [ws("beta"), conv("alpha", "c1")]),  # one scope out of reach
        (stranger_token, [user_scope(owner_id)]),  # someone else's user scope
        (owner_token, [ws("nonexistent")]),
    ]
    for token, scopes in cases:
        sub = Subscriber(channel, token, scopes=scopes)
        error = await sub.error()
        assert error.code() == grpc.StatusCode.NOT_FOUND, scopes
        assert sub.frames == 0
    # Own user scope works.
    mine = Subscriber(channel, stranger_token, scopes=[user_scope(stranger_id)])
    await mine.live()
    mine.cancel()


async def test_invalid_requests_name_their_fields(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    _, token = await member(mesh, "alpha", Role.OWNER)
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({}, {"scopes"}),
        ({"scopes": [events_pb2.Scope()]}, {"scopes[0]"}),
        ({"scopes": [events_pb2.Scope(workspace="alpha")]}, {"scopes[0].workspace"}),
        (
            {"scopes": [events_pb2.Scope(conversation="workspaces/alpha")]},
            {"scopes[0].conversation"},
        ),
        ({"scopes": [ws("alpha")], "after_cursor": "yesterday"}, {"after_cursor"}),
        ({"scopes": [ws("alpha")], "types": [99]}, {"types[0]"}),
        ({"scopes": [ws(f"w{i}") for i in range(17)]}, {"scopes"}),
    ]
    for request, fields in cases:
        error = await Subscriber(channel, token, **request).error()
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        violations = detail(error, error_details_pb2.BadRequest).field_violations
        assert {v.field for v in violations} == fields, request


async def test_removed_member_stream_ends_not_found_before_later_events(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    _, owner_token = await member(mesh, "alpha", Role.OWNER)
    viewer_id, viewer_token = await member(mesh, "alpha", Role.VIEWER)
    sub = Subscriber(channel, viewer_token, scopes=[conv("alpha", "c1")])
    await sub.live()
    owner = Subscriber(channel, owner_token, scopes=[ws("alpha")])
    await owner.live()
    (visible,) = await publish(mesh, [workspace_event("alpha", "c1")])
    await sub.until(1)
    # What the context service does on RemoveWorkspaceMember: commit, then publish.
    assert await mesh.shared.memberships.remove_member("alpha", viewer_id)
    removed = workspace_event("alpha", kind=events_pb2.EVENT_TYPE_MEMBER_CHANGED)
    removed.member_changed.change = events_pb2.CHANGE_KIND_DELETED
    removed.member_changed.member.user = f"users/{viewer_id}"
    await publish(mesh, [removed, workspace_event("alpha", "c1", note="after removal")])
    error = await sub.error()
    # What a unary call on the scope now gets: a non-member does not see the workspace.
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert ids(sub.events) == [visible.id], "nothing after the removal is delivered"
    # Someone else's removal does not disturb the owner's stream.
    assert len(await owner.until(3)) == 3
    owner.cancel()


async def test_revoked_session_ends_its_streams(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    _, token = await member(mesh, "alpha", Role.OWNER)
    sub = Subscriber(channel, token, scopes=[ws("alpha")])
    await sub.live()
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    await stub.RevokeAllSessions(auth_pb2.RevokeAllSessionsRequest(), metadata=bearer(token))
    error = await sub.error()
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason(error) == "ERROR_REASON_SESSION_REVOKED"


async def test_subscriptions_per_principal_are_limited(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    _, token = await member(mesh, "alpha", Role.OWNER)
    subs = [Subscriber(channel, token, scopes=[ws("alpha")]) for _ in range(8)]
    for sub in subs:
        await sub.live()
    error = await Subscriber(channel, token, scopes=[ws("alpha")]).error()
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(error) == "ERROR_REASON_QUOTA_EXCEEDED"
    # Another user is not affected.
    _, other = await member(mesh, "alpha", Role.VIEWER)
    extra = Subscriber(channel, other, scopes=[ws("alpha")])
    await extra.live()
    # Ending one frees its slot (the server notices the cancellation on its own time).
    subs[0].cancel()
    async with asyncio.timeout(CALL_DEADLINE_S):
        while True:
            retry = Subscriber(channel, token, scopes=[ws("alpha")])
            try:
                await retry.live()
                break
            except aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
    for sub in [*subs[1:], extra, retry]:
        sub.cancel()


# -- cursors and retention -------------------------------------------------------------


async def test_cursor_older_than_retention_is_out_of_range() -> None:
    server, _ = await create_server(make_settings(events_retention=100, events_memory=50))
    await server.start()
    try:
        _, token = await member(server, "alpha", Role.OWNER)
        first = (await publish(server, [workspace_event("alpha")]))[0]
        # Enough to pass the trim threshold (every 1000 events) in one group commit.
        await asyncio.gather(
            *(server.shared.bus.publish(workspace_event("alpha")) for _ in range(1100))
        )
        async with aio.insecure_channel(server.address) as channel:
            error = await Subscriber(
                channel, token, scopes=[ws("alpha")], after_cursor=first.cursor
            ).error()
            assert error.code() == grpc.StatusCode.OUT_OF_RANGE
            assert reason(error) == "ERROR_REASON_CURSOR_EXPIRED"
            info = detail(error, error_details_pb2.ErrorInfo)
            oldest = info.metadata["oldest_cursor"]
            assert _position(oldest) > _position(first.cursor)
            # Resuming after the oldest cursor replays everything retained, in order.
            sub = Subscriber(channel, token, scopes=[ws("alpha")], after_cursor=oldest)
            await sub.live()
            listed = await events_pb2_grpc.EventServiceStub(channel).ListEvents(
                events_pb2.ListEventsRequest(scopes=[ws("alpha")], page_size=500),
                metadata=bearer(token),
            )
            assert listed.oldest_cursor == oldest
            assert _position(listed.events[0].cursor) > _position(oldest)
            got = await sub.until(len(listed.events))
            assert ids(got[: len(listed.events)]) == ids(listed.events)
            sub.cancel()
            # A cursor from the future is refused too, never silently accepted.
            ahead = Subscriber(channel, token, scopes=[ws("alpha")], after_cursor="99999999-0")
            error = await ahead.error()
            assert error.code() == grpc.StatusCode.OUT_OF_RANGE
            assert reason(error) == "ERROR_REASON_CURSOR_AHEAD"
    finally:
        await server.shutdown(grace=0)


async def test_a_cursor_ahead_of_a_fresh_log_has_its_own_reason_and_says_where_the_log_is(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    _, token = await member(mesh, "alpha", Role.OWNER)  # a fresh server: the first member
    error = await Subscriber(channel, token, scopes=[ws("alpha")], after_cursor="42-0").error()
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert reason(error) == "ERROR_REASON_CURSOR_AHEAD"
    assert "ahead of the log" in (error.details() or "")
    info = detail(error, error_details_pb2.ErrorInfo)
    # Resuming after the head it names is accepted: the live tail from now on.
    sub = Subscriber(
        channel, token, scopes=[ws("alpha")], after_cursor=info.metadata["head_cursor"]
    )
    await sub.live()
    sub.cancel()


async def test_restart_keeps_history_and_never_reuses_a_cursor() -> None:
    settings = make_settings(database_url=fresh_database_url(), events_memory=20)
    server, _ = await create_server(settings)
    await server.start()
    await member(server, "alpha", Role.OWNER)
    before = await publish(server, [workspace_event("alpha", note=str(i)) for i in range(50)])
    await server.shutdown(grace=0)

    server, _ = await create_server(settings)
    await server.start()
    try:
        # A dev-mode restart has a new signing key: sign in afresh.
        _, token = await member(server, "alpha", Role.VIEWER)
        assert ids(server.shared.bus.recent()) == ids(before[-20:]), "the ring is preloaded"
        after = await publish(server, [workspace_event("alpha", note="new")])
        assert _position(after[0].cursor) > _position(before[-1].cursor)
        async with aio.insecure_channel(server.address) as channel:
            # From storage (older than the in-memory window) into live.
            sub = Subscriber(channel, token, scopes=[ws("alpha")], after_cursor=before[4].cursor)
            await sub.live()
            assert ids(await sub.until(46)) == ids(before[5:] + after)
            sub.cancel()
    finally:
        await server.shutdown(grace=0)


# -- heartbeats --------------------------------------------------------------------------


async def test_idle_streams_get_heartbeats_that_advance_past_other_scopes() -> None:
    server, _ = await create_server(make_settings(events_heartbeat_s=0.2))
    await server.start()
    try:
        _, token = await member(server, "alpha", Role.OWNER)
        await member(server, "beta", Role.OWNER)
        async with aio.insecure_channel(server.address) as channel:
            sub = Subscriber(channel, token, scopes=[ws("alpha")])
            await sub.live()
            others = await publish(server, [workspace_event("beta") for _ in range(3)])
            while _position(sub.cursor) < _position(others[-1].cursor):
                frame = await sub.frame()
                assert frame.WhichOneof("frame") == "heartbeat"
            assert sub.events == []
            sub.cancel()
    finally:
        await server.shutdown(grace=0)


# -- slow consumers ----------------------------------------------------------------------


async def test_slow_subscriber_is_cut_off_with_a_resume_cursor_and_loses_nothing() -> None:
    server, _ = await create_server(make_settings(events_subscriber_buffer=20))
    await server.start()
    # A small, fixed receive window: the stalled client stops the server's writes soon.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    try:
        _, token = await member(server, "alpha", Role.OWNER)
        async with (
            aio.insecure_channel(server.address, options=options) as slow_channel,
            aio.insecure_channel(server.address) as fast_channel,
        ):
            slow = Subscriber(slow_channel, token, scopes=[ws("alpha")])
            fast = Subscriber(fast_channel, token, scopes=[ws("alpha")])
            await slow.live()
            await fast.live()
            big = "x" * 16_384
            published: list[events_pb2.Event] = []
            # The slow one never reads; the fast one keeps up with every event.
            for i in range(400):
                (event,) = await publish(server, [workspace_event("alpha", note=f"{i}{big}")])
                published.append(event)
                await fast.until(len(published))
            assert ids(fast.events) == ids(published)
            error = await slow.error()
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert reason(error) == "ERROR_REASON_SUBSCRIBER_TOO_SLOW"
            resume = detail(error, error_details_pb2.ErrorInfo).metadata["resume_cursor"]
            assert resume == (slow.events[-1].cursor if slow.events else slow.cursor)
            again = Subscriber(slow_channel, token, scopes=[ws("alpha")], after_cursor=resume)
            await again.live()
            await again.until(len(published) - len(slow.events))
            assert ids(slow.events + again.events) == ids(published)
            again.cancel()
            fast.cancel()
    finally:
        await server.shutdown(grace=0)


# -- ListEvents --------------------------------------------------------------------------


async def test_list_events_pages_through_history(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    _, token = await member(mesh, "alpha", Role.OWNER)
    await member(mesh, "beta", Role.OWNER)
    mine = []
    for i in range(25):
        mine += await publish(mesh, [workspace_event("alpha", note=str(i))])
        await publish(mesh, [workspace_event("beta")])
    stub = events_pb2_grpc.EventServiceStub(channel)
    seen: list[events_pb2.Event] = []
    token_ = ""
    pages = 0
    while True:
        page = await stub.ListEvents(
            events_pb2.ListEventsRequest(scopes=[ws("alpha")], page_size=10, page_token=token_),
            metadata=bearer(token),
        )
        seen += page.events
        pages += 1
        token_ = page.next_page_token
        if not token_:
            break
    assert ids(seen) == ids(mine)
    assert pages == 3
    # after_cursor starts later; the token is bound to the request's scopes.
    page = await stub.ListEvents(
        events_pb2.ListEventsRequest(scopes=[ws("alpha")], after_cursor=mine[19].cursor),
        metadata=bearer(token),
    )
    assert ids(page.events) == ids(mine[20:])
    first = await stub.ListEvents(
        events_pb2.ListEventsRequest(scopes=[ws("alpha")], page_size=5), metadata=bearer(token)
    )
    for bad in (
        events_pb2.ListEventsRequest(
            scopes=[conv("alpha", "c1")], page_token=first.next_page_token
        ),
        events_pb2.ListEventsRequest(scopes=[ws("alpha")], page_token="garbage"),
        events_pb2.ListEventsRequest(scopes=[ws("alpha")], page_size=-1),
    ):
        with pytest.raises(aio.AioRpcError) as caught:
            await stub.ListEvents(bad, metadata=bearer(token))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- Stream (bidirectional) ----------------------------------------------------------------


async def _read(call: Any) -> events_pb2.StreamResponse:
    async with asyncio.timeout(CALL_DEADLINE_S):
        async for response in call:
            return response  # type: ignore[no-any-return]
    raise AssertionError("the stream ended")


async def test_stream_adds_removes_acks_and_pings() -> None:
    server, _ = await create_server(
        make_settings(events_max_subscriptions_per_stream=2, events_heartbeat_s=60)
    )
    await server.start()
    try:
        _, token = await member(server, "alpha", Role.OWNER)
        await member(server, "beta", Role.OWNER)
        async with aio.insecure_channel(server.address) as channel:
            commands = Commands()
            call = events_pb2_grpc.EventServiceStub(channel).Stream(
                commands.__aiter__(), metadata=bearer(token)
            )
            history = await publish(server, [workspace_event("alpha", "c1")])
            commands.send(
                add=events_pb2.AddSubscription(
                    subscription_id="all", scopes=[ws("alpha")], after_cursor="0-0"
                )
            )
            assert (await _read(call)).added.subscription_id == "all"
            replayed = await _read(call)
            assert replayed.events.subscription_id == "all"
            assert ids(replayed.events.batch.events) == ids(history)
            commands.send(
                add=events_pb2.AddSubscription(subscription_id="c1", scopes=[conv("alpha", "c1")])
            )
            assert (await _read(call)).added.subscription_id == "c1"
            # Not a member of beta: that subscription ends, the stream goes on.
            commands.send(add=events_pb2.AddSubscription(subscription_id="x", scopes=[ws("beta")]))
            ended = (await _read(call)).ended
            assert (ended.subscription_id, ended.code) == ("x", grpc.StatusCode.NOT_FOUND.value[0])
            commands.send(add=events_pb2.AddSubscription(subscription_id="y", scopes=[ws("alpha")]))
            ended = (await _read(call)).ended
            assert (ended.subscription_id, ended.code) == (
                "y",
                grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
            )
            commands.send(ping=events_pb2.Ping(nonce="n-1"))
            assert (await _read(call)).pong.nonce == "n-1"

            (event,) = await publish(server, [workspace_event("alpha", "c1")])
            got: dict[str, list[str]] = {}
            while sum(len(v) for v in got.values()) < 2:
                frame = (await _read(call)).events
                got.setdefault(frame.subscription_id, []).extend(ids(frame.batch.events))
            assert got == {"all": [event.id], "c1": [event.id]}

            commands.send(ack=events_pb2.Ack(subscription_id="all", cursor=history[0].cursor))
            commands.send(remove=events_pb2.RemoveSubscription(subscription_id="all"))
            ended = (await _read(call)).ended
            assert (ended.subscription_id, ended.code) == ("all", 0)
            assert ended.resume_cursor == history[0].cursor, "resumes after the last ack"

            # Half-closing ends the stream cleanly.
            commands.close()
            async with asyncio.timeout(CALL_DEADLINE_S):
                assert [r async for r in call] == []
            assert await call.code() == grpc.StatusCode.OK
    finally:
        await server.shutdown(grace=0)


async def test_stream_protocol_errors_end_the_stream_invalid_argument(
    mesh: SwitchboardServer, channel: aio.Channel
) -> None:
    _, token = await member(mesh, "alpha", Role.OWNER)
    bad_frames: list[dict[str, Any]] = [
        {},
        {"add": events_pb2.AddSubscription(subscription_id="", scopes=[ws("alpha")])},
        {"remove": events_pb2.RemoveSubscription(subscription_id="nope")},
        {"ack": events_pb2.Ack(subscription_id="nope", cursor="1-0")},
        {"ping": events_pb2.Ping(nonce="n" * 65)},
    ]
    for frame in bad_frames:
        commands = Commands()
        call = events_pb2_grpc.EventServiceStub(channel).Stream(
            commands.__aiter__(), metadata=bearer(token)
        )
        commands.send(**frame)
        with pytest.raises(aio.AioRpcError) as caught:
            await _read(call)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, frame
        commands.close()


def _position(cursor: str) -> tuple[int, int]:
    major, _, minor = cursor.partition("-")
    return int(major), int(minor)

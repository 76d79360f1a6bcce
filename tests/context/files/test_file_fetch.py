"""Fetching a message's URL part (context/files/fetch.py) against a real local HTTP
server: the egress policy on every address and every redirect, the size limit while
the body streams, the deadline, and errors that name the part's field."""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from switchboard.context.files.fetch import UrlFetcher, name_of
from switchboard.platform.errors import (
    DependencyUnavailable,
    DestinationBlocked,
    InvalidArgument,
    RequestTooLarge,
)
from switchboard.platform.security.egress import EgressPolicy
from tests.infra.httprecorder import Recorder, Reply, recording

pytestmark = pytest.mark.unit

FIELD = "message.parts[0].file.uri"
LIMIT = 64 * 1024


@pytest.fixture
def server() -> Iterator[Recorder]:
    with recording() as recorder:
        yield recorder


@pytest.fixture
async def loopback() -> AsyncIterator[UrlFetcher]:
    fetcher = UrlFetcher(EgressPolicy(allow_loopback=True), timeout_s=10.0)
    yield fetcher
    await fetcher.close()


@pytest.fixture
async def default_policy() -> AsyncIterator[UrlFetcher]:
    fetcher = UrlFetcher(EgressPolicy(), timeout_s=10.0)
    yield fetcher
    await fetcher.close()


async def test_an_allowed_url_is_fetched_with_its_type_and_name(
    server: Recorder, loopback: UrlFetcher
) -> None:
    server.routes["/docs/report%20q3.pdf"] = Reply(
        200, {"content-type": "application/PDF; charset=binary"}, b"%PDF-1.4 ..."
    )
    fetched = await loopback.fetch(server.url("/docs/report%20q3.pdf"), FIELD, limit=LIMIT)
    assert (fetched.data, fetched.media_type, fetched.display_name) == (
        b"%PDF-1.4 ...",
        "application/pdf",
        "report q3.pdf",
    )
    # Bytes as stored: no compression asked for.
    assert server.seen[0].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/x", "http://169.254.169.254/latest/meta-data/", "http://[::1]/"]
)
async def test_a_blocked_address_is_refused_naming_the_field(
    default_policy: UrlFetcher, url: str
) -> None:
    with pytest.raises(DestinationBlocked) as refused:
        await default_policy.fetch(url, FIELD, limit=LIMIT)
    assert [v.field for v in refused.value.violations] == [FIELD]


async def test_metadata_stays_blocked_even_with_loopback_allowed(loopback: UrlFetcher) -> None:
    with pytest.raises(DestinationBlocked):
        await loopback.fetch("http://169.254.169.254/", FIELD, limit=LIMIT)


async def test_a_redirect_is_followed_under_the_same_checks(
    server: Recorder, loopback: UrlFetcher
) -> None:
    server.routes["/moved"] = Reply(302, {"location": "/here.txt"})
    server.routes["/here.txt"] = Reply(200, {"content-type": "text/plain"}, b"hello")
    server.routes["/to-metadata"] = Reply(307, {"location": "http://169.254.169.254/"})
    fetched = await loopback.fetch(server.url("/moved"), FIELD, limit=LIMIT)
    assert (fetched.data, fetched.display_name) == (b"hello", "here.txt")
    with pytest.raises(DestinationBlocked) as refused:
        await loopback.fetch(server.url("/to-metadata"), FIELD, limit=LIMIT)
    assert [v.field for v in refused.value.violations] == [FIELD]


async def test_endless_redirects_stop(server: Recorder, loopback: UrlFetcher) -> None:
    server.routes["/loop"] = Reply(301, {"location": "/loop"})
    with pytest.raises(InvalidArgument, match="redirected more than 5 times"):
        await loopback.fetch(server.url("/loop"), FIELD, limit=LIMIT)
    assert len(server.requests_to("/loop")) == 6


async def test_a_declared_length_over_the_limit_is_refused_before_the_body(
    server: Recorder, loopback: UrlFetcher
) -> None:
    server.routes["/big"] = Reply(200, {}, b"x" * (LIMIT + 1))
    with pytest.raises(RequestTooLarge, match=str(LIMIT)):
        await loopback.fetch(server.url("/big"), FIELD, limit=LIMIT)


async def test_a_body_over_the_limit_is_refused_while_it_streams(
    server: Recorder, loopback: UrlFetcher
) -> None:
    # No length up front, and the body never ends until the test says so: the
    # refusal can only come from counting the bytes as they arrive.
    end = threading.Event()
    server.routes["/stream"] = Reply(200, {}, b"x" * (2 * LIMIT), chunk_bytes=8192, hold_end=end)
    try:
        with pytest.raises(RequestTooLarge):
            await loopback.fetch(server.url("/stream"), FIELD, limit=LIMIT)
        assert not end.is_set()
    finally:
        end.set()


async def test_a_body_at_the_limit_is_fetched(server: Recorder, loopback: UrlFetcher) -> None:
    server.routes["/exact"] = Reply(200, {}, b"y" * LIMIT, chunk_bytes=4096)
    fetched = await loopback.fetch(server.url("/exact"), FIELD, limit=LIMIT)
    assert fetched.data == b"y" * LIMIT


def unfetchable(error: InvalidArgument) -> str:
    """The ``fetch_error`` of a refused URL part, which must name the part's field."""
    assert [v.field for v in error.violations] == [FIELD]
    assert error.message.startswith(FIELD + " ")
    return error.metadata["fetch_error"]


@pytest.mark.parametrize("status", [404, 403, 429, 500, 503])
async def test_an_error_status_is_the_urls_not_our_outage(
    server: Recorder, loopback: UrlFetcher, status: int
) -> None:
    # Even a 5xx: that server's state is the client's resource's, and UNAVAILABLE would
    # have the client retry a dead link.
    server.routes["/x"] = Reply(status)
    with pytest.raises(InvalidArgument, match=f"answered HTTP {status}") as refused:
        await loopback.fetch(server.url("/x"), FIELD, limit=LIMIT)
    assert not isinstance(refused.value, DependencyUnavailable)
    assert unfetchable(refused.value) == "http_status"
    assert refused.value.metadata["http_status"] == str(status)


async def test_a_host_that_does_not_resolve_is_the_urls(default_policy: UrlFetcher) -> None:
    # .invalid never resolves (RFC 6761): the DNS answers that there is no such name.
    url = "https://no-such-host.invalid/picture.png"
    with pytest.raises(InvalidArgument) as refused:
        await default_policy.fetch(url, FIELD, limit=LIMIT)
    assert unfetchable(refused.value) == "no_such_host"
    assert "'no-such-host.invalid' could not be resolved" in refused.value.message
    assert url in refused.value.message


async def test_a_refused_connection_is_the_urls(loopback: UrlFetcher) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens there now.
    with pytest.raises(InvalidArgument, match="connection to its server failed") as refused:
        await loopback.fetch(f"http://127.0.0.1:{port}/a.png", FIELD, limit=LIMIT)
    assert unfetchable(refused.value) == "connect_failed"


async def test_an_answer_that_is_not_http_is_the_urls(loopback: UrlFetcher) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def garble() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"this is not HTTP at all\r\n\r\n")

        answering = threading.Thread(target=garble)
        answering.start()
        try:
            with pytest.raises(InvalidArgument) as refused:
                await loopback.fetch(f"http://127.0.0.1:{port}/x", FIELD, limit=LIMIT)
            assert unfetchable(refused.value) == "bad_answer"
        finally:
            answering.join(10)


async def test_a_slow_server_runs_out_of_time(server: Recorder) -> None:
    hold = threading.Event()
    server.routes["/slow"] = Reply(200, {}, b"late", hold=hold)
    fetcher = UrlFetcher(EgressPolicy(allow_loopback=True), timeout_s=0.5)
    try:
        with pytest.raises(InvalidArgument, match=r"did not answer within 0\.5 s") as refused:
            await fetcher.fetch(server.url("/slow"), FIELD, limit=LIMIT)
        assert unfetchable(refused.value) == "timeout"
    finally:
        hold.set()
        await fetcher.close()


@pytest.mark.parametrize("url", ["ftp://example.com/a", "file:///etc/passwd", "http://u:p@x/"])
async def test_only_plain_http_urls_are_fetched(loopback: UrlFetcher, url: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await loopback.fetch(url, FIELD, limit=LIMIT)
    assert [v.field for v in refused.value.violations] == [FIELD]


def test_names_come_from_the_path_else_the_host() -> None:
    assert name_of("https://example.com/a/b/photo.jpg?size=2") == "photo.jpg"
    assert name_of("https://example.com/") == "example.com"

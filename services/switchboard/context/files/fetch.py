"""Fetching a URL part of a message: through the egress policy, bounded in size and time.

A client may name a file in a message by an http(s) URL; the server fetches it
and stores the content as a file of the message's workspace. The URL is a
user-given address fetched from inside the operator's network, so it goes
through the egress policy as an integration's endpoint does
(``platform/security/egress.py``):

- the host is resolved and every address checked before anything is sent
  (``DestinationBlocked``, INVALID_ARGUMENT naming the part's field), and the
  connection dials a checked address (``egress.http_client``): no DNS
  rebinding;
- a redirect is followed only as a new URL under the same checks, at most
  ``MAX_REDIRECTS`` times, so a redirect to a blocked address is refused like
  the address itself;
- the whole fetch, redirects included, has one deadline (``timeout_s``);
- the body is counted as it streams and the fetch stops at the first byte past
  the limit (``RequestTooLarge``, RESOURCE_EXHAUSTED), whatever
  ``Content-Length`` said; a ``Content-Length`` over the limit is refused
  before the body is read.

Whose fault a failure is. The URL is the client's: a resource it named that cannot
be fetched is its input's problem, not our outage (a client retries UNAVAILABLE,
and would retry a dead link forever). So the part is refused INVALID_ARGUMENT,
on its field, with why, and ``fetch_error`` in the metadata: a host that does
not exist (``no_such_host``), a connection refused, reset or failing TLS
(``connect_failed``), an answer broken off or not HTTP (``bad_answer``), any
status but 2xx (``http_status``, with ``http_status``: 404, 429 and 503 alike: that
server's state is not ours), redirects without a location or too many
(``redirect``), the deadline passed (``timeout``), and the egress policy's
refusal (``DestinationBlocked``). A body over the limit stays
RESOURCE_EXHAUSTED ``REQUEST_TOO_LARGE``, as inline bytes over it are. Only what
is ours stays UNAVAILABLE: the server's own DNS lookup failing or timing out (it
says nothing of the name and fails every fetch alike), and the fetcher's
connections all busy. Errors name the URL the client gave, never an address it
resolved to.
"""

from __future__ import annotations

import asyncio
import posixpath
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from switchboard.platform.errors import (
    DependencyUnavailable,
    DestinationBlocked,
    FieldViolation,
    InvalidArgument,
    RequestTooLarge,
    ResolutionFailed,
)
from switchboard.platform.security.egress import (
    EgressPolicy,
    http_client,
    no_such_host,
    parse_http_endpoint,
    resolve_checked,
)

#: Redirects followed, each one checked as a new URL.
MAX_REDIRECTS: Final = 5
#: The longest display name taken from a URL's path.
MAX_NAME_CHARS: Final = 200
_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class Fetched:
    """A URL's content, whole and within the limit."""

    data: bytes
    #: The answer's Content-Type without parameters ("" when it sent none).
    media_type: str
    #: The last segment of the URL's path, else its host.
    display_name: str


def name_of(url: str) -> str:
    """A display name for content fetched from ``url``: its file name, else its host."""
    parts = urlsplit(url)
    name = posixpath.basename(unquote(parts.path)).strip()
    return (name or parts.hostname or "download")[:MAX_NAME_CHARS]


class UrlFetcher:
    """Fetches URL parts through one client whose every connection is checked."""

    def __init__(self, policy: EgressPolicy, *, timeout_s: float, max_connections: int = 16):
        self._policy = policy
        self._timeout_s = timeout_s
        self._client = http_client(
            policy,
            timeout_s=timeout_s,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections // 4
            ),
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, field: str, *, limit: int) -> Fetched:
        """The content at ``url`` (at most ``limit`` bytes); errors name ``field``."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._follow(url, field, limit)
        except TimeoutError:
            raise _unfetchable(
                field, url, f"did not answer within {self._timeout_s:g} s", "timeout"
            ) from None
        except ResolutionFailed as exc:
            # Checked before the request, and again at connect time (a redirect's host).
            if no_such_host(exc):
                raise _unfetchable(field, url, exc.message, "no_such_host") from None
            raise DependencyUnavailable(
                f"{field}: the server could not look up the host of {url!r} ({exc.message}); retry"
            ) from None

    async def _follow(self, url: str, field: str, limit: int) -> Fetched:
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            endpoint = parse_http_endpoint(current, field)
            # Checked here for an error that names the field; the client checks
            # again at connect time, so a name that changes its answer is caught.
            await resolve_checked(
                endpoint.host, endpoint.port, self._policy, timeout_s=self._timeout_s, field=field
            )
            try:
                # identity: the limit counts the bytes stored, and a compressed body
                # could expand past it inside one chunk.
                async with self._client.stream(
                    "GET", endpoint.url, headers={"accept": "*/*", "accept-encoding": "identity"}
                ) as response:
                    if response.status_code in _REDIRECTS:
                        location = response.headers.get("location", "")
                        if not location:
                            raise _unfetchable(
                                field, url, "answered a redirect without a location", "redirect"
                            )
                        current = urljoin(endpoint.url, location)
                        continue
                    _check_status(response.status_code, url, field)
                    data = await _read(response, url, field, limit)
                    media_type = response.headers.get("content-type", "").split(";")[0]
                    return Fetched(
                        data=data,
                        media_type=media_type.strip().lower(),
                        display_name=name_of(current),
                    )
            except DestinationBlocked as exc:
                # Refused at connect time: the name resolved differently than when checked.
                raise DestinationBlocked(
                    f"{field} {exc.message}",
                    [FieldViolation(field, exc.message)],
                    metadata=exc.metadata,
                ) from None
            except httpx.PoolTimeout:
                # Every connection of the fetcher is taken: this server is busy.
                raise DependencyUnavailable(
                    f"{field}: the server is fetching too many URLs at once; retry"
                ) from None
            except httpx.HTTPError as exc:
                why, kind = _transport_failure(exc)
                raise _unfetchable(field, url, f"{why} ({type(exc).__name__})", kind) from None
        raise _unfetchable(field, url, f"redirected more than {MAX_REDIRECTS} times", "redirect")


def _unfetchable(
    field: str, url: str, why: str, kind: str, *, metadata: dict[str, str] | None = None
) -> InvalidArgument:
    """The client's URL cannot be fetched: its input's problem, on its field."""
    description = f"{url!r} could not be fetched: {why}"
    return InvalidArgument(
        f"{field} {description}",
        [FieldViolation(field, description)],
        metadata={"fetch_error": kind, **(metadata or {})},
    )


def _transport_failure(exc: httpx.HTTPError) -> tuple[str, str]:
    """What went wrong reaching the URL's server, and its ``fetch_error`` kind."""
    if isinstance(exc, httpx.ConnectTimeout):
        return "its server did not accept a connection in time", "connect_failed"
    if isinstance(exc, httpx.ConnectError):
        return "the connection to its server failed (refused, reset or TLS)", "connect_failed"
    if isinstance(exc, httpx.TimeoutException):
        return "its server stopped answering", "timeout"
    return "its server broke off the answer or did not speak HTTP", "bad_answer"


def _check_status(status: int, url: str, field: str) -> None:
    if 200 <= status < 300:
        return
    raise _unfetchable(
        field,
        url,
        f"its server answered HTTP {status}",
        "http_status",
        metadata={"http_status": str(status)},
    )


async def _read(response: httpx.Response, url: str, field: str, limit: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"{field}: {url!r} is {declared} bytes; the limit is {limit}")
    data = bytearray()
    async for chunk in response.aiter_raw():
        data += chunk
        if len(data) > limit:
            raise RequestTooLarge(f"{field}: {url!r} is larger than {limit} bytes")
    return bytes(data)

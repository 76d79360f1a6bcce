"""The credential a client presents, and how its session renews itself.

A session's access token is short-lived; its refresh token is single-use:
``RefreshToken`` spends it and returns a new pair, and a spent token presented
again is taken for theft, so the server revokes the whole session
(docs/security.md). Hence the rules here:

- refresh **before** the access token expires, on the client's own clock: the
  refresh time is measured from when the pair arrived, with the token's
  lifetime read from its ``iat``/``exp`` claims, so a wrong wall clock on the
  client does not matter;
- **single flight**: however many calls find the token due, or are refused
  with it, one ``RefreshToken`` call is made and all of them wait for it;
- a refresh token is **presented at most once**. It is sent only over a
  connected channel, so "the server is down" leaves it unspent (and the next
  call tries again); once sent it counts as spent whatever happens. If no
  answer came back (the connection dropped mid-call) the client keeps using the
  access token it has until the server refuses it, then raises ``SignedOut``
  rather than risk presenting the token twice;
- a refusal (UNAUTHENTICATED) ends the session: ``SignedOut``.

And the person's own data (docs/privacy.md), at the end: deleting the account, and the
archive of everything the deployment holds about them (``Client.delete_my_account``,
``Client.export_my_data``, ``Client.wait_for_export``, ``Client.download_export``). An
export is a long-running operation: ``ExportMyData`` starts it, ``GetDataExport`` says how
far it is, and once SUCCEEDED ``DownloadFile`` of its name streams the ZIP.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

import grpc
from google.rpc import status_pb2

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.context.v1 import context_pb2
from switchboard.client.backoff import Backoff
from switchboard.client.errors import (
    DeadlineExceeded,
    InvalidArgument,
    SessionRevoked,
    SignedOut,
    SwitchboardError,
    Unauthenticated,
    from_status,
)

log = logging.getLogger("switchboard.client")

#: Refresh this long before the access token expires (or halfway, if sooner).
DEFAULT_REFRESH_MARGIN_S: Final = 60.0

TokensCallback = Callable[[auth_pb2.TokenPair | None], Awaitable[None] | None]
Clock = Callable[[], float]


class RefreshNotSent(Exception):
    """The refresh token never left the client (no connection): it is still unspent."""

    def __init__(self, error: SwitchboardError) -> None:
        super().__init__(str(error))
        self.error = error


#: Exchanges a refresh token for a new pair; raises RefreshNotSent if it was not sent.
Exchange = Callable[[str], Awaitable[auth_pb2.TokenPair]]


@dataclass(frozen=True)
class TokenTimes:
    """When to refresh an access token and when it expires, on the keeper's clock."""

    refresh_at: float
    expire_at: float

    def due(self, now: float) -> bool:
        return now >= self.refresh_at

    def expired(self, now: float) -> bool:
        return now >= self.expire_at


def token_lifetime(access_token: str) -> float | None:
    """``exp - iat`` of a JWT access token, read without verifying it (the server
    verifies; the client only needs to know when to renew). None if unreadable."""
    parts = access_token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError):
        return None
    if not isinstance(claims, dict):
        return None
    issued, expires = claims.get("iat"), claims.get("exp")
    if not isinstance(issued, int | float) or not isinstance(expires, int | float):
        return None
    lifetime = float(expires) - float(issued)
    return lifetime if lifetime > 0 else None


def schedule(
    pair: auth_pb2.TokenPair,
    *,
    now: float,
    wall_now: float,
    fresh: bool,
    margin_s: float = DEFAULT_REFRESH_MARGIN_S,
) -> TokenTimes:
    """When ``pair`` should be refreshed and when its access token expires.

    ``fresh``: the pair arrived just now from the server, so its remaining life
    is its whole lifetime (from the token), whatever the local wall clock says.
    A pair restored from storage has lived for an unknown time: then its
    ``access_token_expire_time`` is compared with the wall clock. The refresh
    comes ``margin_s`` before the expiry, or halfway through the remaining
    life when that is sooner (short-lived tokens).
    """
    lifetime = token_lifetime(pair.access_token)
    if fresh and lifetime is not None:
        remaining = lifetime
    elif pair.HasField("access_token_expire_time"):
        expires = pair.access_token_expire_time
        remaining = expires.seconds + expires.nanos / 1e9 - wall_now
    else:
        remaining = lifetime or 0.0
    remaining = max(remaining, 0.0)
    refresh_in = max(remaining - margin_s, remaining / 2)
    return TokenTimes(refresh_at=now + refresh_in, expire_at=now + remaining)


Kind = Literal["none", "session", "api_key"]


class TokenKeeper:
    """Holds the credential; hands out the bearer for each call and renews the session.

    ``exchange`` performs the RefreshToken call; ``clock`` is monotonic seconds
    (replaceable, so tests can move time on without waiting for it); ``wall``
    is the time of day, used only for pairs restored from storage.
    """

    def __init__(
        self,
        exchange: Exchange,
        *,
        margin_s: float = DEFAULT_REFRESH_MARGIN_S,
        clock: Clock = time.monotonic,
        wall: Clock = time.time,
        on_tokens: TokensCallback | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self._exchange = exchange
        self._margin_s = margin_s
        self._clock = clock
        self._wall = wall
        self._on_tokens = on_tokens
        self._backoff = backoff or Backoff(initial_s=1.0, max_s=30.0)
        self._kind: Kind = "none"
        self._api_key = ""
        self._pair: auth_pb2.TokenPair | None = None
        self._times: TokenTimes | None = None
        # Empty once presented: a refresh token is never sent twice.
        self._refresh_token = ""
        self._task: asyncio.Task[None] | None = None
        self._signed_out: SignedOut | None = None
        self._not_before = 0.0
        self._failed_tries = 0
        # Bumped whenever the credential is replaced: a refresh that was under
        # way for the previous one must not touch the new one.
        self._generation = 0
        #: Successful refreshes so far.
        self.refreshes = 0

    # -- state --------------------------------------------------------------------------

    @property
    def kind(self) -> Kind:
        return self._kind

    @property
    def pair(self) -> auth_pb2.TokenPair | None:
        """The current token pair (its refresh token emptied once presented)."""
        if self._pair is None:
            return None
        current = auth_pb2.TokenPair()
        current.CopyFrom(self._pair)
        current.refresh_token = self._refresh_token
        return current

    @property
    def times(self) -> TokenTimes | None:
        return self._times

    def current(self) -> str:
        """The credential the next call would present, without renewing it."""
        if self._kind == "api_key":
            return self._api_key
        return self._pair.access_token if self._pair is not None else ""

    def use_session(self, pair: auth_pb2.TokenPair, *, fresh: bool) -> None:
        if not pair.access_token:
            raise ValueError("the token pair has no access token")
        self._replace("session")
        self._install(pair, fresh=fresh)

    async def signed_in(self, pair: auth_pb2.TokenPair) -> None:
        """A pair just issued by Register or Login: use it, and tell ``on_tokens``."""
        self.use_session(pair, fresh=True)
        await self._notify(self.pair)

    async def signed_out(self) -> None:
        """Forget every credential on purpose, and tell ``on_tokens``."""
        self.clear()
        await self._notify(None)

    def use_api_key(self, key: str) -> None:
        if not key:
            raise ValueError("the API key is empty")
        self._replace("api_key")
        self._api_key = key

    def clear(self) -> None:
        """Forget every credential (signed out on purpose)."""
        self._replace("none")

    def _replace(self, kind: Kind) -> None:
        self._generation += 1
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._kind, self._api_key = kind, ""
        self._pair, self._times, self._refresh_token = None, None, ""
        self._signed_out = None

    def _install(self, pair: auth_pb2.TokenPair, *, fresh: bool) -> None:
        self._pair = auth_pb2.TokenPair()
        self._pair.CopyFrom(pair)
        self._refresh_token = pair.refresh_token
        self._times = schedule(
            pair, now=self._clock(), wall_now=self._wall(), fresh=fresh, margin_s=self._margin_s
        )
        self._not_before = 0.0
        self._failed_tries = 0

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- per call -----------------------------------------------------------------------

    async def bearer(self) -> str:
        """The credential for a call starting now ('' for none), renewed first when due.

        A due refresh that cannot happen now (the server unreachable) does not
        fail the call while the access token still lives; it is tried again
        after a backoff.
        """
        if self._signed_out is not None:
            raise self._signed_out
        times = self._times
        if self._kind != "session" or times is None:
            return self.current()
        now = self._clock()
        if (self._refresh_token or self._task) and times.due(now) and now >= self._not_before:
            try:
                await self._refresh_shared()
            except SignedOut:
                raise
            except SwitchboardError as error:
                if times.expired(self._clock()):
                    raise
                log.warning("access token not refreshed yet; using it while it lasts: %s", error)
        return self.current()

    async def rejected(self, used: str, error: SwitchboardError) -> None:
        """A call that presented ``used`` was refused UNAUTHENTICATED (``error``).

        Returns when a retry with the current credential may succeed (another
        caller renewed it already, or this one did); raises ``SignedOut`` when
        the session is over, or ``error`` itself for an API key or no credential.
        """
        if self._signed_out is not None:
            raise self._signed_out
        if self._kind != "session":
            raise error
        if self._pair is not None and self._pair.access_token != used:
            return
        if isinstance(error, SessionRevoked):
            raise await self._lose("the session was revoked; sign in again", error)
        if self._task is None and not self._refresh_token:
            raise await self._lose(
                "the access token was refused and no refresh token is left; sign in again", error
            )
        await self._refresh_shared()

    async def refused_again(self, used: str, error: SwitchboardError) -> SwitchboardError:
        """What to raise when a call was refused even after ``rejected``: a revoked
        session ends it (``SignedOut``); anything else is the server's answer."""
        if (
            isinstance(error, SessionRevoked)
            and self._kind == "session"
            and self._pair is not None
            and self._pair.access_token == used
        ):
            return await self._lose("the session was revoked; sign in again", error)
        return error

    async def refresh(self) -> auth_pb2.TokenPair:
        """Renew the session now (whether or not it is due)."""
        if self._signed_out is not None:
            raise self._signed_out
        if self._kind != "session":
            raise SignedOut("there is no session to refresh")
        if self._task is None and not self._refresh_token:
            raise SignedOut("the refresh token was already presented; sign in again")
        await self._refresh_shared()
        pair = self.pair
        if pair is None:
            raise SignedOut("signed out while refreshing")
        return pair

    # -- the one refresh ----------------------------------------------------------------

    async def _refresh_shared(self) -> None:
        task = self._task
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._refresh(self._generation), name="switchboard-token-refresh"
            )
            self._task = task
            task.add_done_callback(self._refreshed)
        # Shielded: one waiter giving up (its own deadline, its task cancelled)
        # must not abort the refresh the others wait for.
        await asyncio.shield(task)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None
        if not task.cancelled():
            # Each waiter re-raises it; retrieved here so that a refresh nobody
            # waits for any more is not reported as an unretrieved exception.
            task.exception()

    async def _refresh(self, generation: int) -> None:
        token = self._refresh_token
        if not token:
            raise SignedOut("the refresh token was already presented; sign in again")
        try:
            pair = await self._exchange(token)
        except RefreshNotSent as unsent:
            if generation == self._generation:
                self._not_before = self._clock() + self._backoff.delay(self._failed_tries)
                self._failed_tries += 1
            raise unsent.error from None
        except SwitchboardError as error:
            if generation != self._generation:
                raise
            self._refresh_token = ""
            if isinstance(error, Unauthenticated | InvalidArgument):
                raise await self._lose(
                    "the session could not be renewed; sign in again", error
                ) from error
            # Sent, and no answer: the server may have spent it. Never again.
            log.warning("token refresh outcome unknown; the session ends with its access token")
            raise
        except BaseException:
            # Cancelled after it may have been sent: spent, unless replaced anyway.
            if generation == self._generation:
                self._refresh_token = ""
            raise
        if generation != self._generation:
            return  # signed in or out meanwhile: the new credential stays
        self._install(pair, fresh=True)
        self.refreshes += 1
        await self._notify(pair)

    async def _lose(self, message: str, cause: SwitchboardError) -> SignedOut:
        signed_out = SignedOut(message, request_id=cause.request_id)
        signed_out.__cause__ = cause
        if self._task is asyncio.current_task():
            self._task = None  # losing from inside the refresh: it must not cancel itself
        self._replace("none")
        self._signed_out = signed_out
        await self._notify(None)
        return signed_out

    async def _notify(self, pair: auth_pb2.TokenPair | None) -> None:
        if self._on_tokens is None:
            return
        try:
            outcome = self._on_tokens(pair)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            # The new pair is in memory either way; the application's store
            # failing must not turn a renewed session into a failed call.
            log.exception("the on_tokens callback failed")


# -- the person's own data (docs/privacy.md) ---------------------------------------------

if TYPE_CHECKING:
    from switchboard.api.auth.v1.auth_pb2_grpc import AuthServiceAsyncStub
    from switchboard.api.context.v1.context_pb2_grpc import ContextServiceAsyncStub

#: How long ``wait_for_export`` waits unless told: an archive of years of messages and
#: files takes a while to write.
DEFAULT_EXPORT_WAIT_S: Final = 600.0
#: Polls start quick (a small account's archive is ready in well under a second) and
#: slow down to one every few seconds for a large one.
EXPORT_POLL: Final = Backoff(initial_s=0.1, max_s=3.0, multiplier=2.0, jitter=0.2)
_PAGE: Final = 100

#: What a data export is named by: its name, or the export itself.
ExportLike = str | context_pb2.DataExport


def export_name(export: ExportLike) -> str:
    return export if isinstance(export, str) else export.name


def owned_workspaces(
    delete: Iterable[str], hand_over: Mapping[str, str]
) -> list[auth_pb2.OwnedWorkspace]:
    """The ``workspaces`` of a DeleteMyAccount: each of ``delete`` DELETE, then each of
    ``hand_over`` HAND_OVER to the member it maps to (``users/{user}``). A workspace in
    both is a mistake of the caller's, refused before anything is sent."""
    deleted = list(delete)
    both = sorted(set(deleted) & set(hand_over))
    if both:
        raise ValueError(f"a workspace is either deleted or handed over, not both: {both}")
    return [
        *(
            auth_pb2.OwnedWorkspace(
                workspace=workspace, action=auth_pb2.OWNED_WORKSPACE_ACTION_DELETE
            )
            for workspace in deleted
        ),
        *(
            auth_pb2.OwnedWorkspace(
                workspace=workspace,
                action=auth_pb2.OWNED_WORKSPACE_ACTION_HAND_OVER,
                new_owner=new_owner,
            )
            for workspace, new_owner in hand_over.items()
        ),
    ]


async def owned_alone(
    auth: AuthServiceAsyncStub, context: ContextServiceAsyncStub, timeout_s: float | None
) -> list[str]:
    """The caller's workspaces where they are the only owner (what DeleteMyAccount needs
    named), in ListWorkspaces' order."""
    me = await auth.GetPrincipal(auth_pb2.GetPrincipalRequest(), timeout=timeout_s)
    user = me.user.name
    found: list[str] = []
    token = ""
    while True:
        page = await context.ListWorkspaces(
            context_pb2.ListWorkspacesRequest(page_size=_PAGE, page_token=token),
            timeout=timeout_s,
        )
        for workspace in page.workspaces:
            owners = await _owners(context, workspace.name, timeout_s)
            if owners == {user}:
                found.append(workspace.name)
        token = page.next_page_token
        if not token:
            return found


async def _owners(
    context: ContextServiceAsyncStub, workspace: str, timeout_s: float | None
) -> set[str]:
    owners: set[str] = set()
    token = ""
    while True:
        page = await context.ListWorkspaceMembers(
            context_pb2.ListWorkspaceMembersRequest(
                parent=workspace, page_size=_PAGE, page_token=token
            ),
            timeout=timeout_s,
        )
        owners.update(m.user for m in page.members if m.role == context_pb2.WORKSPACE_ROLE_OWNER)
        token = page.next_page_token
        if not token:
            return owners


def export_failure(export: context_pb2.DataExport) -> SwitchboardError:
    """The typed error a FAILED export's ``error`` names (RESOURCE_EXHAUSTED past the
    size limit, say)."""
    status = export.error
    if status.code == grpc.StatusCode.OK.value[0]:
        # FAILED without a reason is the server's fault; the client still says which.
        status = status_pb2.Status(
            code=grpc.StatusCode.UNKNOWN.value[0], message=f"{export.name} failed"
        )
    return from_status(status)


async def wait_for_export(
    context: ContextServiceAsyncStub,
    export: ExportLike,
    *,
    timeout_s: float,
    poll: Backoff = EXPORT_POLL,
) -> context_pb2.DataExport:
    """GetDataExport until the export is SUCCEEDED (returned) or FAILED (its error
    raised), ``timeout_s`` at most (then ``DeadlineExceeded``)."""
    if timeout_s <= 0:
        raise ValueError("timeout_s must be positive")
    name = export_name(export)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    attempt = 0
    while True:
        left = deadline - loop.time()
        if left <= 0:
            break
        # Each read gets what is left of the wait, so the whole stays within it.
        response = await context.GetDataExport(
            context_pb2.GetDataExportRequest(name=name), timeout=left
        )
        current = response.export
        if current.state == context_pb2.DATA_EXPORT_STATE_SUCCEEDED:
            return current
        if current.state == context_pb2.DATA_EXPORT_STATE_FAILED:
            raise export_failure(current)
        delay = min(poll.delay(attempt), deadline - loop.time())
        if delay <= 0:
            break
        await asyncio.sleep(delay)
        attempt += 1
    raise DeadlineExceeded(f"{name} was not written within {timeout_s:g} s")

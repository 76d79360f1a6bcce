"""Access on open streams: a stream keeps what it was allowed only while a unary call would be.

A unary call is authorized once, when it starts; a stream lives on. Every
streaming RPC therefore opens a ``Grant`` for its caller and goes through it
for each new action (a Converse send, a Stream AddSubscription: ``authorize``)
and for each resource it keeps relaying (a run watched, scopes subscribed: a
``Hold``). The grant re-runs the check a unary call would make at that moment,
the credential first (``verify_principal``: session or API key revoked or
expired, access token expired) and then the policy for every held resource,
whenever something says access may have changed:

- an event that changes access to a workspace or user the grant watches (a
  member removed or changed, a workspace deleted, a session or API key
  revoked), at its place in log order, in every process (the log is shared);
- a revocation of the authenticator (``on_revocation``): its message on
  ``REVOCATION_CHANNEL``, which reaches every process at once, or the
  revocation's own security event, which reaches them whatever crashes (a
  session evicted by the per-user limit has its SESSION_REVOKED, detail
  ``session_limit``, like any other revocation);
- the credential's own expiry (a timer at the instant a unary call would start
  to refuse it);
- every ``reauthorize_s``, jittered (a backstop for changes nothing announces);
- while the deployment cannot vouch for those signals (the revocation cache is
  not fresh or the event log is degraded: Redis is away), every
  ``degraded_recheck_s``, against the database. A revoked credential stays
  revoked while Redis is down, for streams as for unary calls.

A wake that says access may have changed makes the grant *suspect*: relays
hold their next frame until the check has run (``confirm``), so nothing
produced after a change reaches the client unless access survived it. A failed
check ends what depended on it with the status a unary call would get:
UNAUTHENTICATED (reason SESSION_REVOKED or TOKEN_EXPIRED) for the credential,
which ends the whole stream; NOT_FOUND (no longer a member, workspace deleted)
or PERMISSION_DENIED (the role no longer suffices) for a held resource, which
ends that hold only. A check that cannot reach the database fails closed
(UNAVAILABLE, also for a reader that let a raw driver error out: every lookup
maps an outage to ``DatabaseUnavailable``) when it was woken by a change or by
degraded mode; a periodic one keeps the stream and retries sooner, since
nothing said access changed.

This module does not import grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any, Final, Protocol, TypeVar

from switchboard.platform import background
from switchboard.platform.errors import (
    DatabaseUnavailable,
    DependencyUnavailable,
    InternalError,
    SwitchboardError,
    Unauthenticated,
)
from switchboard.platform.events.bus import Fanout
from switchboard.platform.security.policy import (
    MembershipReader,
    Permission,
    Policy,
    Principal,
    Role,
    owner_of,
)
from switchboard.platform.store.db import is_outage, log_failure

#: Jitter's own generator: the module-level one is the process's (a library or a test
#: may seed it), and jitter neither needs nor should disturb it.
_JITTER: Final = random.Random()  # noqa: S311 - jitter, not security

log = logging.getLogger("switchboard.access")

T = TypeVar("T")
K = TypeVar("K")

#: Re-check interval while Redis is away. With the default 0.75 s lease this
#: keeps a revocation made on another process within about 1 s of every stream.
DEGRADED_RECHECK_S: Final = 0.25
#: Database lookups one degraded-mode round runs at once: an outage of Redis
#: must not turn into one of the database. Rounds take longer with more streams.
SWEEP_CONCURRENCY: Final = 4
#: After a periodic check could not reach the database: try again this soon.
RETRY_S: Final = 5.0
#: A timer that fires a hair early must not find the credential still valid.
_EXPIRY_SLACK_S: Final = 0.005


class CredentialVerifier(Protocol):
    async def verify_principal(self, principal: Principal) -> float | None:
        """Raise Unauthenticated unless the principal's credential holds now.

        Returns when it stops holding by itself (epoch seconds), None if never.
        """
        ...


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _Lookups:
    """One round of checks: each credential and each membership is read at most once."""

    def __init__(
        self,
        verifier: CredentialVerifier,
        memberships: MembershipReader,
        limit: asyncio.Semaphore | None = None,
    ) -> None:
        self._verifier = verifier
        self._memberships = memberships
        self._limit = limit
        self._credentials: dict[Principal, asyncio.Future[float | None]] = {}
        self._roles: dict[tuple[str, str, bool], asyncio.Future[Role | None]] = {}
        self.policy = Policy(self)

    async def verify(self, principal: Principal) -> float | None:
        return await self._shared(
            self._credentials, principal, lambda: self._verifier.verify_principal(principal)
        )

    async def role_of(
        self, workspace_id: str, user_id: str, *, include_deleted: bool = False
    ) -> Role | None:
        return await self._shared(
            self._roles,
            (workspace_id, user_id, include_deleted),
            lambda: self._memberships.role_of(
                workspace_id, user_id, include_deleted=include_deleted
            ),
        )

    async def _shared(
        self,
        cache: dict[K, asyncio.Future[T]],
        key: K,
        start: Callable[[], Coroutine[Any, Any, T]],
    ) -> T:
        future = cache.get(key)
        if future is None:
            future = cache[key] = asyncio.ensure_future(self._limited(start))
            future.add_done_callback(_consume)
        # Shielded: one waiter giving up does not cancel the lookup for the others.
        return await asyncio.shield(future)

    async def _limited(self, start: Callable[[], Coroutine[Any, Any, T]]) -> T:
        try:
            if self._limit is None:
                return await start()
            async with self._limit:
                return await start()
        except SwitchboardError:
            raise
        except Exception as exc:
            # An outage is UNAVAILABLE whoever let it through, never an internal error.
            if is_outage(exc):
                log_failure(log, "access lookup failed", exc)
                raise DatabaseUnavailable() from exc
            raise


class _Wake:
    """Why a grant re-checks, which decides how an outage is treated."""

    def __init__(self, *, suspect: bool, fail_closed: bool) -> None:
        self.suspect = suspect
        self.fail_closed = fail_closed


#: Something said access may have changed: hold output, fail closed.
CHANGE: Final = _Wake(suspect=True, fail_closed=True)
#: The periodic backstop: nothing said anything.
PERIODIC: Final = _Wake(suspect=False, fail_closed=False)


class AccessWatch:
    """Every open stream's grant in this process, and the signals that wake them."""

    def __init__(
        self,
        fanout: Fanout,
        verifier: CredentialVerifier,
        memberships: MembershipReader,
        *,
        reauthorize_s: float,
        degraded: Callable[[], bool],
        degraded_recheck_s: float = DEGRADED_RECHECK_S,
        clock: Callable[[], float] = time.time,
        action_memberships: MembershipReader | None = None,
    ) -> None:
        """``memberships`` is what the re-checks read (a change said access may have
        changed: they must read what it wrote); ``action_memberships`` (default the
        same) what a stream's new action is checked with, as its unary call would be
        (the membership cache, ``platform/security/membership.py``)."""
        self._verifier = verifier
        self._memberships = memberships
        self._action_memberships = action_memberships or memberships
        self._reauthorize_s = reauthorize_s
        self._degraded = degraded
        self._degraded_recheck_s = degraded_recheck_s
        self.clock = clock
        self._grants: dict[Grant, None] = {}
        # Grants by the workspace or user names whose access changes concern them.
        self._by_name: dict[str, dict[Grant, None]] = {}
        self._by_session: dict[str, dict[Grant, None]] = {}
        self._by_key: dict[str, dict[Grant, None]] = {}
        self._by_user: dict[str, dict[Grant, None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._rounds: set[asyncio.Task[None]] = set()
        self._closed = False
        fanout.access_listeners.append(self._access_changed)

    # -- streams -----------------------------------------------------------------------

    def open(self, principal: Principal) -> Grant:
        """A grant for one stream of ``principal``; close it when the stream ends."""
        grant = Grant(self, principal)
        self._grants[grant] = None
        if principal.session_id:
            self._by_session.setdefault(principal.session_id, {})[grant] = None
        if principal.api_key_id:
            self._by_key.setdefault(principal.api_key_id, {})[grant] = None
        self._by_user.setdefault(principal.user_id, {})[grant] = None
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = background.spawn(self._sweep_loop(), name="access-sweeper", logger=log)
        return grant

    def _forget(self, grant: Grant) -> None:
        self._grants.pop(grant, None)
        principal = grant.principal
        _unindex(self._by_session, principal.session_id, grant)
        _unindex(self._by_key, principal.api_key_id, grant)
        _unindex(self._by_user, principal.user_id, grant)
        for name in grant.watches:
            _unindex(self._by_name, name, grant)

    def _rewatch(self, grant: Grant, old: Iterable[str], new: Iterable[str]) -> None:
        for name in old:
            _unindex(self._by_name, name, grant)
        for name in new:
            self._by_name.setdefault(name, {})[grant] = None

    def lookups(self, limit: asyncio.Semaphore | None = None, *, action: bool = False) -> _Lookups:
        """One round's lookups: a re-check's, or (``action``) a new action's."""
        memberships = self._action_memberships if action else self._memberships
        return _Lookups(self._verifier, memberships, limit)

    @property
    def reauthorize_s(self) -> float:
        return self._reauthorize_s

    async def close(self) -> None:
        self._closed = True
        tasks = [*self._rounds, *([self._sweeper] if self._sweeper is not None else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for grant in list(self._grants):
            grant.close()

    # -- signals -----------------------------------------------------------------------

    def _access_changed(self, name: str, only: str) -> None:
        # Runs inside the bus's delivery, in log order: wake synchronously.
        for grant in list(self._by_name.get(name, ())):
            if not only or grant.owner == only:
                grant.wake(CHANGE)

    def revoked(self, kind: str, ident: str) -> None:
        """The authenticator's revocation message ``kind:ident`` (after its caches dropped it)."""
        if kind == "session":
            grants: Iterable[Grant] = self._by_session.get(ident, ())
        elif kind == "apikey":
            grants = self._by_key.get(ident, ())
        elif kind == "user":
            grants = self._by_user.get(ident, ())
        else:
            # Messages may have been missed (a resync), or a kind from a newer
            # peer: every stream re-checks, in one round that reads each
            # credential and membership once.
            if self._grants and not self._closed:
                background.spawn(self._sweep(), name="access-resync", logger=log, keep=self._rounds)
            return
        for grant in list(grants):
            grant.wake(CHANGE)

    async def _sweep_loop(self) -> None:
        # Runs while streams are open; costs one call of degraded() per tick otherwise.
        failures = background.FailureNotes(log)
        while self._grants and not self._closed:
            await asyncio.sleep(self._degraded_recheck_s)
            try:
                if self._degraded():
                    await self._sweep()
            except Exception as exc:  # noqa: BLE001 - the next tick sweeps again
                failures.failed("access sweep failed", exc)
            else:
                failures.succeeded()

    async def _sweep(self) -> None:
        lookups = self.lookups(asyncio.Semaphore(SWEEP_CONCURRENCY))
        await asyncio.gather(*(grant.sweep(lookups) for grant in list(self._grants)))


def _unindex(index: dict[str, dict[Grant, None]], key: str, grant: Grant) -> None:
    if not key:
        return
    grants = index.get(key)
    if grants is not None:
        grants.pop(grant, None)
        if not grants:
            del index[key]


class Hold:
    """Resources one stream keeps relaying, re-checked for as long as it does."""

    def __init__(
        self,
        grant: Grant,
        names: tuple[tuple[str, str], ...],
        permission: Permission,
        on_change: Callable[[], None] | None,
    ) -> None:
        self.grant = grant
        #: (resource name, request field it came from), as ``Policy.authorize`` takes them.
        self.names = names
        self.permission = permission
        self._on_change = on_change
        self._error: SwitchboardError | None = None
        self._released = False
        # Readers in ``guard`` waiting for the source: woken when access is lost.
        self._wakers: list[Callable[[], None]] = []
        self.owners = tuple(dict.fromkeys(_watch_name(name, field) for name, field in names))

    @property
    def error(self) -> SwitchboardError | None:
        """Why this hold ended (its own access, or the grant's credential); None while it holds."""
        return self.grant.error or self._error

    def changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:  # see Grant._notify
                log.exception("stream access listener failed")

    def lose(self, error: SwitchboardError) -> None:
        if self._error is None:
            self._error = error
        self._wake()
        self.changed()

    def release(self) -> None:
        """The stream stopped relaying these resources."""
        self.grant.release(self)
        self._released = True
        self._wake()

    def _wake(self) -> None:
        for wake in list(self._wakers):
            wake()

    async def confirm(self) -> None:
        """Return once access is confirmed after every change so far; raise if it was lost."""
        await self.grant.confirm()
        if self._error is not None:
            raise self._error

    async def guard(self, source: AsyncIterator[T]) -> AsyncIterator[T]:
        """``source``'s items while access holds; raises ``error`` as soon as it is lost.

        Ends even while ``source`` is idle, and releases nothing produced after
        a change until access is confirmed again. ``source`` runs in a task of
        its own (one task throughout, so its timeouts and context stay its own)
        that is at most one item ahead, and is closed when this ends.
        """
        queue: asyncio.Queue[T | _Signal] = asyncio.Queue(maxsize=1)

        def wake() -> None:
            # A full queue means the reader is not waiting; it checks before its next read.
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(_WAKE)

        pump = asyncio.get_running_loop().create_task(_pump(source, queue), name="access-guard")
        self._wakers.append(wake)
        try:
            while True:
                error = self.error
                if error is not None:
                    raise error
                if self._released:
                    return
                item = await queue.get()
                if isinstance(item, _Signal):
                    if item.failure is not None:
                        raise item.failure
                    if item is _END:
                        return
                    continue
                await self.confirm()
                yield item
        finally:
            self._wakers.remove(wake)
            pump.cancel()
            await asyncio.wait((pump,))


class _Signal:
    """Not an item: the source ended or failed, or access may have changed."""

    def __init__(self, failure: BaseException | None = None) -> None:
        self.failure = failure


_END: Final = _Signal()
_WAKE: Final = _Signal()


async def _pump(source: AsyncIterator[T], queue: asyncio.Queue[T | _Signal]) -> None:
    try:
        async for item in source:
            await queue.put(item)
        await queue.put(_END)
    except Exception as exc:  # noqa: BLE001 - re-raised by the reader, whose caller maps it
        await queue.put(_Signal(exc))
    finally:
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


def _watch_name(name: str, field: str) -> str:
    """The workspace or user whose access changes concern ``name``."""
    owner = owner_of(name, field)
    return f"{'workspaces' if owner.kind == 'workspace' else 'users'}/{owner.id}"


class Grant:
    """One stream's standing access: its principal, its holds, their re-checks."""

    def __init__(self, watch: AccessWatch, principal: Principal) -> None:
        self._watch = watch
        self.principal = principal
        self.owner = principal.user_name
        self.error: SwitchboardError | None = None
        self._holds: dict[Hold, None] = {}
        # Workspaces being authorized right now: watched before the read, so a
        # change committed after the read still wakes this grant.
        self._authorizing: dict[str, int] = {}
        self.watches: tuple[str, ...] = (self.owner,)
        self._watch._rewatch(self, (), self.watches)
        self._generation = 0
        self._confirmed = 0
        self._suspect = False
        self._fail_closed = False
        self._checker: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[], None]] = []
        self._expiry: asyncio.TimerHandle | None = None
        # When the credential stops holding by itself (epoch seconds), and the
        # instant ``confirm`` last asked for a check because it had passed.
        self._until: float | None = None
        self._until_checked: float | None = None
        self._periodic: asyncio.TimerHandle | None = None
        self._closed = False
        # The expiry timer is armed by the first credential check, which every
        # stream makes when it starts (``verify`` or ``hold``).
        self._arm_periodic()

    # -- what streams call ---------------------------------------------------------------

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (synchronously) whenever access may have changed or was lost."""
        self._listeners.append(listener)

    async def authorize(self, name: str, permission: Permission, field: str) -> Role | None:
        """Check one new action like its unary call: credential now, then the policy.

        A lost credential also ends the grant; an outage fails this action only
        (UNAVAILABLE, as the unary call would), not the stream.
        """
        if self.error is not None:
            raise self.error
        watch_name = _watch_name(name, field)
        self._authorizing[watch_name] = self._authorizing.get(watch_name, 0) + 1
        self._update_watches()
        try:
            lookups = self._watch.lookups(action=True)
            await self._credential(lookups, fail_closed=False)
            return await lookups.policy.authorize(self.principal, name, permission, field)
        finally:
            left = self._authorizing[watch_name] - 1
            if left:
                self._authorizing[watch_name] = left
            else:
                del self._authorizing[watch_name]
            self._update_watches()

    async def verify(self) -> None:
        """Check the credential alone (a new action that names no resource)."""
        if self.error is not None:
            raise self.error
        await self._credential(self._watch.lookups(), fail_closed=False)

    async def hold(
        self,
        names: Iterable[tuple[str, str]],
        permission: Permission,
        on_change: Callable[[], None] | None = None,
    ) -> Hold:
        """Authorize ``names`` (resource, field) for ``permission`` and keep them authorized.

        Raises like ``authorize``; the returned hold ends (``Hold.error``) when
        access to any of them is lost.
        """
        if self.error is not None:
            raise self.error
        hold = Hold(self, tuple(names), permission, on_change)
        self._holds[hold] = None
        self._update_watches()
        try:
            lookups = self._watch.lookups(action=True)
            await self._credential(lookups, fail_closed=False)
            for name, field in hold.names:
                await lookups.policy.authorize(self.principal, name, permission, field)
        except BaseException:
            self.release(hold)
            raise
        return hold

    def release(self, hold: Hold) -> None:
        if self._holds.pop(hold, None) is not None:
            self._update_watches()

    async def confirm(self) -> None:
        """Wait out a pending check after a change; raise the credential's error if lost."""
        while True:
            if self.error is not None:
                raise self.error
            until = self._until
            if until is not None and until != self._until_checked and self._watch.clock() >= until:
                # The credential ran out and its timer has not fired yet (timers
                # run on another clock and a little late): check now, as a
                # unary call at this instant would, before anything is sent.
                self._until_checked = until
                self.wake(CHANGE)
            if not self._suspect or self._closed:
                return
            checker = self._ensure_checker()
            await asyncio.wait((checker,))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for timer in (self._expiry, self._periodic):
            if timer is not None:
                timer.cancel()
        if self._checker is not None:
            self._checker.cancel()
        self._holds.clear()
        self._listeners.clear()
        self._watch._forget(self)

    # -- waking ---------------------------------------------------------------------------

    def wake(self, why: _Wake) -> None:
        if self._closed or self.error is not None:
            return
        self._generation += 1
        if why.suspect:
            self._suspect = True
        if why.fail_closed:
            self._fail_closed = True
        self._notify()
        self._ensure_checker()

    def _notify(self) -> None:
        # Runs inside the bus's delivery and the cache's message handler: a
        # failing listener must not break those for everyone else.
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("stream access listener failed")
        for hold in list(self._holds):
            hold.changed()

    def _ensure_checker(self) -> asyncio.Task[None]:
        checker = self._checker
        if checker is None or checker.done():
            checker = self._checker = asyncio.create_task(self._check_loop(), name="access-check")
        return checker

    def _update_watches(self) -> None:
        names = {self.owner: None}
        for hold in self._holds:
            names.update(dict.fromkeys(hold.owners))
        names.update(dict.fromkeys(self._authorizing))
        watches = tuple(names)
        if watches != self.watches:
            old, self.watches = self.watches, watches
            if not self._closed:
                self._watch._rewatch(self, old, watches)

    def _arm_periodic(self) -> None:
        # Jittered, so streams opened together (after a restart) do not all
        # re-check in the same instant.
        delay = self._watch.reauthorize_s * _JITTER.uniform(0.8, 1.2)
        self._arm_timer("_periodic", delay, self._periodic_due)

    def _periodic_due(self) -> None:
        self._arm_periodic()
        self.wake(PERIODIC)

    def _arm_expiry(self, until: float | None) -> None:
        self._until = until
        if until is None:
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None
            return
        delay = max(0.0, until - self._watch.clock()) + _EXPIRY_SLACK_S
        self._arm_timer("_expiry", delay, lambda: self.wake(CHANGE))

    def _arm_timer(self, slot: str, delay: float, callback: Callable[[], None]) -> None:
        if self._closed:
            return
        current: asyncio.TimerHandle | None = getattr(self, slot)
        if current is not None:
            current.cancel()
        setattr(self, slot, asyncio.get_running_loop().call_later(delay, callback))

    # -- checking ---------------------------------------------------------------------------

    async def _check_loop(self) -> None:
        try:
            while not self._closed and self.error is None and self._confirmed < self._generation:
                target = self._generation
                fail_closed, self._fail_closed = self._fail_closed, False
                completed = await self._check(self._watch.lookups(), fail_closed=fail_closed)
                self._confirmed = target
                if not completed:
                    self._arm_timer("_periodic", RETRY_S, self._periodic_due)
            if self._confirmed >= self._generation:
                self._suspect = False
        # A bug here must end the stream, never leave it unchecked.
        except Exception as exc:  # noqa: BLE001 - logged by _failed
            self._failed(exc)

    async def sweep(self, lookups: _Lookups) -> None:
        """A degraded-mode round (Redis away): re-check against the database, fail closed."""
        if self._closed or self.error is not None:
            return
        try:
            await self._check(lookups, fail_closed=True)
        except Exception as exc:  # noqa: BLE001 - logged by _failed
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """A re-check raised what ``_check`` does not expect: end the grant, precisely."""
        log_failure(log, "access re-check failed", exc)
        if is_outage(exc):
            self._lose(DatabaseUnavailable())
        else:
            self._lose(InternalError("access re-check failed"))

    async def _check(self, lookups: _Lookups, *, fail_closed: bool) -> bool:
        """Re-run every check; False if it could not complete (outage, tolerated)."""
        try:
            await self._credential(lookups, fail_closed=fail_closed)
        except DependencyUnavailable:
            return False
        except Unauthenticated:
            return True
        for hold in list(self._holds):
            if hold.error is not None:
                continue
            try:
                for name, field in hold.names:
                    await lookups.policy.authorize(self.principal, name, hold.permission, field)
            except DependencyUnavailable as exc:
                if fail_closed:
                    self._lose(exc)
                    return True
                return False
            except Unauthenticated as exc:
                self._lose(exc)
                return True
            except SwitchboardError as exc:
                hold.lose(exc)
        return True

    async def _credential(self, lookups: _Lookups, *, fail_closed: bool) -> None:
        """Verify the credential; losing the grant (and raising) if it no longer holds."""
        try:
            until = await lookups.verify(self.principal)
        except Unauthenticated as exc:
            self._lose(exc)
            raise
        except DependencyUnavailable as exc:
            if fail_closed:
                self._lose(exc)
            raise
        self._arm_expiry(until)

    def _lose(self, error: SwitchboardError) -> None:
        if self.error is not None or self._closed:
            return
        self.error = error
        for hold in list(self._holds):
            hold.lose(error)
        self._notify()

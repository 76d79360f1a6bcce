"""Turns a bearer credential into a principal, cheaply and revocation-aware.

Per call, an access token costs two dictionary lookups once it has been
verified: verified tokens are cached (bounded, until they expire) and the
state of their session is cached. Revocation must still act at once in every
process, so the session cache is only trusted while the cache layer is
*fresh*: while this process's Redis subscription has confirmed, within the
lease, that it has seen every revocation message (``Cache.fresh``). A
revoking process writes the database first, then publishes; if it cannot
publish it waits out the lease, by which time every other process has stopped
trusting its cache. While not fresh (Redis paused, killed, unreachable) every
call reads its session from the database: slower, never open.

A revoking process that dies between its commit and its message sends none.
The revocation's security event (SESSION_REVOKED, REFRESH_REUSE_DETECTED,
API_KEY_REVOKED) is written in the revocation's transaction (the outbox), so
it reaches every process whatever crashes, at worst a few seconds late through
the outbox relay: each process drops its cached state on the event too
(``on_event``), through the same path as the message (``_invalidate``).

An invalidation racing a database read must not let the stale read into the
cache, so every invalidation bumps a generation and a read is cached only if
the generation did not move while it ran.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from switchboard.api.events.v1 import events_pb2
from switchboard.platform.cache import Cache
from switchboard.platform.errors import (
    DependencyUnavailable,
    SessionRevoked,
    TokenExpired,
    Unauthenticated,
)
from switchboard.platform.security.credentials.accesstokens import (
    EXPIRED,
    AccessClaims,
    AccessTokens,
)
from switchboard.platform.security.credentials.opaque import OpaqueSecrets, parse_api_key
from switchboard.platform.security.credentials.records import CredentialRecords, SessionStatus
from switchboard.platform.security.policy import (
    ALL_SCOPES,
    DELEGATED_BACKGROUND,
    DELEGATED_KEY,
    AuthMethod,
    Principal,
    Scope,
)
from switchboard.platform.store.db import log_failure

log = logging.getLogger("switchboard.auth")

REVOCATION_CHANNEL: Final = "switchboard:auth:revocations"
#: What ``on_revocation`` listeners get as the kind when any credential may have changed.
ANY: Final = "*"
# last_used_time is a hint for humans; writing it on every call would make
# each API-key call a database write.
API_KEY_TOUCH_INTERVAL: Final = dt.timedelta(seconds=60)
_API_KEY_PREFIX: Final = "sbk_"
# Refusals, each saying what to do. An unknown key id and a wrong secret read the
# same: which key ids exist is not the caller's to learn.
API_KEY_INVALID: Final = (
    "the API key is not valid here (mistyped or cut short, or of another deployment); "
    "check it, or create a new one with CreateApiKey"
)
API_KEY_REVOKED: Final = "the API key has been revoked; create a new one with CreateApiKey"
API_KEY_EXPIRED: Final = "the API key has expired; create a new one with CreateApiKey"
SESSION_ENDED: Final = (
    "the session has ended (signed out, revoked, or not in this server's database); sign in again"
)
SESSION_EXPIRED: Final = "the session has expired; sign in again"
#: Security events that say a session was revoked.
_SESSION_ENDED: Final = frozenset(
    {
        events_pb2.SECURITY_EVENT_KIND_SESSION_REVOKED,
        events_pb2.SECURITY_EVENT_KIND_REFRESH_REUSE_DETECTED,
    }
)
K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class _KeyState:
    user_id: str
    digest: str
    scopes: frozenset[Scope]
    expires_at: dt.datetime | None
    revoked: bool
    last_used_at: dt.datetime | None
    assistant_pins: tuple[tuple[str, int], ...] = ()


def _last_segment(name: str) -> str:
    """``s`` of ``users/u/sessions/s`` (and ``u`` of ``users/u``)."""
    return name.rpartition("/")[2]


def _scopes(scope_names: Iterable[str]) -> frozenset[Scope]:
    # Unknown names (from a newer peer) are dropped, never guessed at.
    return frozenset(Scope(s) for s in scope_names if s in ALL_SCOPES)


class _Bounded(Generic[K, V]):
    """A dict that forgets its oldest entries beyond ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data: dict[K, V] = {}

    def put(self, key: K, value: V) -> None:
        if self.limit <= 0:
            return
        data = self.data
        if key not in data and len(data) >= self.limit:
            del data[next(iter(data))]
        data[key] = value


class CredentialAuthenticator:
    """The platform ``Authenticator`` for access tokens and API keys."""

    def __init__(
        self,
        tokens: AccessTokens,
        store: CredentialRecords,
        secrets: OpaqueSecrets,
        cache: Cache,
        *,
        token_cache_size: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tokens = tokens
        self._store = store
        self._secrets = secrets
        self._cache = cache
        #: Epoch seconds now: what every expiry (token, session, API key) is judged by.
        self.clock = clock
        self._leeway = tokens.policy.leeway_s
        self._verified: _Bounded[str, tuple[AccessClaims, Principal]] = _Bounded(token_cache_size)
        self._sessions: _Bounded[str, SessionStatus] = _Bounded(token_cache_size)
        self._keys: _Bounded[str, _KeyState] = _Bounded(token_cache_size)
        self._generation = 0
        self._listeners: list[Callable[[str, str], None]] = []
        cache.subscribe(REVOCATION_CHANNEL, self._on_message, self._on_resync)

    def on_revocation(self, listener: Callable[[str, str], None]) -> None:
        """Call ``listener(kind, ident)`` for every revocation (its message or its event,
        usually both), after the caches dropped it (``kind`` is ``session``, ``user``,
        ``apikey``, or ``ANY`` when messages may have been missed). It runs on the event
        loop and must not block or raise.
        """
        self._listeners.append(listener)

    # Invalidation: a revocation message (fast) or the revocation's event (crash-proof).

    def _on_message(self, message: str) -> None:
        kind, _, ident = message.partition(":")
        self._invalidate(kind, ident)

    def on_event(self, event: events_pb2.Event) -> None:
        """A delivered event (``EventBus.listen``): a revocation's drops what it revoked.

        Usually the revocation message did so already; this covers a revoking
        process that died before sending it.
        """
        if event.type != events_pb2.EVENT_TYPE_SECURITY:
            return
        security = event.security
        if security.kind in _SESSION_ENDED:
            if security.session:
                self._invalidate("session", _last_segment(security.session))
            elif event.user:
                self._invalidate("user", _last_segment(event.user))
        elif security.kind == events_pb2.SECURITY_EVENT_KIND_API_KEY_REVOKED:
            if security.api_key:
                self._invalidate("apikey", _last_segment(security.api_key))
            elif event.user:
                # Which key is not said: forget every key, stay correct.
                self._invalidate(ANY, "")

    def _invalidate(self, kind: str, ident: str) -> None:
        self._generation += 1
        if kind == "session":
            self._sessions.data.pop(ident, None)
        elif kind == "user":
            stale = [sid for sid, s in self._sessions.data.items() if s.user_id == ident]
            for sid in stale:
                del self._sessions.data[sid]
        elif kind == "apikey":
            self._keys.data.pop(ident, None)
        else:  # unknown kinds come from newer peers: forget everything, stay correct
            self._on_resync()
            return
        for listener in self._listeners:
            listener(kind, ident)

    def _on_resync(self) -> None:
        self._generation += 1
        self._sessions.data.clear()
        self._keys.data.clear()
        for listener in self._listeners:
            listener(ANY, "")

    async def announce(self, kind: str, ident: str) -> None:
        """Tell every process sharing the deployment that ``kind:ident`` was revoked.

        Call after the revocation is committed to the database.
        """
        await self._cache.publish(REVOCATION_CHANNEL, f"{kind}:{ident}")

    # Authentication.

    async def authenticate(self, credential: str) -> Principal:
        if credential.startswith(_API_KEY_PREFIX):
            return await self._api_key(credential)
        now = self.clock()
        cached = self._verified.data.get(credential)
        if cached is None:
            claims = self._tokens.verify(credential, now=now)
            principal = _principal_of(claims)
            self._verified.put(credential, (claims, principal))
        else:
            claims, principal = cached
            if claims.expires_at <= now - self._leeway:
                del self._verified.data[credential]
                raise TokenExpired(EXPIRED)
        if principal.api_key_id:
            # A server acting for a call made with this key: the key must still hold,
            # and what it pins holds for the call as it did where it was made.
            _, pinned = await self._key_holds(principal.api_key_id)
            if pinned:
                principal = dataclasses.replace(principal, assistant_pins=pinned)
        elif principal.session_id:
            await self._check_session(claims.session, claims.subject)
        # Else a server's own work for the person (``DELEGATED_BACKGROUND``): no
        # credential of theirs to check; each act is authorized on its resource.
        return principal

    async def verify_principal(self, principal: Principal) -> float | None:
        """Re-check ``principal``'s credential as a new call would (for long streams).

        Raises TokenExpired once its access token would be refused, and
        SessionRevoked / Unauthenticated once its session or API key is revoked
        or expired. Otherwise returns when the credential stops holding by
        itself (epoch seconds; None for a key that never expires), so a stream
        can end at that instant.
        """
        if principal.api_key_id:
            return await self._check_key(principal.api_key_id)
        if principal.expires_at and principal.expires_at <= self.clock() - self._leeway:
            raise TokenExpired(EXPIRED)
        if not principal.session_id:
            # A server's own work for the person: its token's expiry alone.
            return float(principal.expires_at + self._leeway) if principal.expires_at else None
        session_until = await self._check_session(principal.session_id, principal.user_id)
        if not principal.expires_at:
            return session_until
        return min(session_until, float(principal.expires_at + self._leeway))

    async def _check_key(self, key_id: str) -> float | None:
        return (await self._key_holds(key_id))[0]

    async def _key_holds(self, key_id: str) -> tuple[float | None, tuple[tuple[str, int], ...]]:
        """When the key stops holding by itself (None: never), and what it pins;
        Unauthenticated once it is revoked or expired."""
        state = self._keys.data.get(key_id) if self._cache.fresh() else None
        if state is None:
            try:
                row = await self._store.api_key(key_id)
            except (SQLAlchemyError, OSError, TimeoutError) as exc:
                log_failure(log, "API key lookup failed", exc)
                raise DependencyUnavailable("credential check is unavailable; retry") from None
            if row is None or row.revoked_at is not None:
                raise Unauthenticated(API_KEY_REVOKED)
            expires_at, pinned = row.expires_at, row.assistant_pins
        else:
            if state.revoked:
                raise Unauthenticated(API_KEY_REVOKED)
            expires_at, pinned = state.expires_at, state.assistant_pins
        if expires_at is not None and expires_at <= self._now():
            raise Unauthenticated(API_KEY_EXPIRED)
        return (expires_at.timestamp() if expires_at is not None else None), pinned

    async def _check_session(self, session_id: str, user_id: str) -> float:
        """The session's expiry (epoch seconds) if it holds; SessionRevoked otherwise."""
        state = self._sessions.data.get(session_id) if self._cache.fresh() else None
        if state is None:
            generation = self._generation
            try:
                state = await self._store.session_status(session_id)
            except (SQLAlchemyError, OSError, TimeoutError) as exc:
                log_failure(log, "session lookup failed", exc)
                raise DependencyUnavailable("credential check is unavailable; retry") from None
            if state is not None and generation == self._generation and self._cache.fresh():
                self._sessions.put(session_id, state)
        if state is None or state.revoked or state.user_id != user_id:
            raise SessionRevoked(SESSION_ENDED)
        if state.expires_at <= self._now():
            raise SessionRevoked(SESSION_EXPIRED)
        return state.expires_at.timestamp()

    async def _api_key(self, credential: str) -> Principal:
        key_id = parse_api_key(credential)
        if key_id is None:
            raise Unauthenticated(API_KEY_INVALID)
        state = self._keys.data.get(key_id) if self._cache.fresh() else None
        if state is None:
            generation = self._generation
            try:
                row = await self._store.api_key(key_id)
            except (SQLAlchemyError, OSError, TimeoutError) as exc:
                log_failure(log, "API key lookup failed", exc)
                raise DependencyUnavailable("credential check is unavailable; retry") from None
            if row is None:
                raise Unauthenticated(API_KEY_INVALID)
            state = _KeyState(
                user_id=row.user_id,
                digest=row.digest,
                scopes=_scopes(row.scopes),
                expires_at=row.expires_at,
                revoked=row.revoked_at is not None,
                last_used_at=row.last_used_at,
                assistant_pins=row.assistant_pins,
            )
            if generation == self._generation and self._cache.fresh():
                self._keys.put(key_id, state)
        # Constant-time comparison of the digests: the id alone proves nothing.
        if not self._secrets.matches(credential, state.digest):
            raise Unauthenticated(API_KEY_INVALID)
        now = self._now()
        if state.revoked:
            raise Unauthenticated(API_KEY_REVOKED)
        if state.expires_at is not None and state.expires_at <= now:
            raise Unauthenticated(API_KEY_EXPIRED)
        if state.last_used_at is None or now - state.last_used_at >= API_KEY_TOUCH_INTERVAL:
            await self._touch(key_id, state, now)
        return Principal(
            user_id=state.user_id,
            auth_method=AuthMethod.API_KEY,
            scopes=state.scopes,
            api_key_id=key_id,
            expires_at=int(state.expires_at.timestamp()) if state.expires_at else 0,
            assistant_pins=state.assistant_pins,
        )

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    async def _touch(self, key_id: str, state: _KeyState, now: dt.datetime) -> None:
        try:
            await self._store.touch_api_key(key_id, now)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            # Not worth failing the caller's request over a usage timestamp.
            log_failure(log, "could not record API key use", exc)
            return
        if key_id in self._keys.data:
            self._keys.data[key_id] = dataclasses.replace(state, last_used_at=now)


def _principal_of(claims: AccessClaims) -> Principal:
    """The principal an access token names: a person's session, or a server acting for a
    call made with an API key (``key:``) or for the person's background work (``bg:``),
    as ``rpc/outbound/peers.delegated_session`` mints them."""
    session, key = claims.session, ""
    if session.startswith(DELEGATED_KEY):
        session, key = "", session.removeprefix(DELEGATED_KEY)
    elif session.startswith(DELEGATED_BACKGROUND):
        session = ""
    return Principal(
        user_id=claims.subject,
        auth_method=AuthMethod.API_KEY if key else AuthMethod.PASSWORD,
        scopes=_scopes(claims.scopes),
        session_id=session,
        api_key_id=key,
        expires_at=claims.expires_at,
    )

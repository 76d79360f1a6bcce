"""Accounts: registration, login, sessions, refresh rotation, API keys.

The domain of the auth service: it takes the request messages, decides
(validation, limits, authorization of the caller's own resources) and answers
with the response messages; ``mapping.py`` turns the store's records into
messages and ``servicer.py`` is transport only. Every credential it hands out
is shown once and stored only as a hash.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from switchboard.api.auth.v1 import auth_pb2
from switchboard.api.events.v1 import events_pb2
from switchboard.auth import mapping
from switchboard.auth.erasure import AccountDeletion
from switchboard.auth.oidc import OidcVerifier
from switchboard.auth.passwords import PasswordHasher, check_password_policy
from switchboard.auth.store import (
    ApiKeyRecord,
    AuthStore,
    IdentityRecord,
    Keyset,
    NewUser,
    Redemption,
    SessionRecord,
    UserRecord,
)
from switchboard.platform.cache import Cache
from switchboard.platform.errors import (
    AlreadyExists,
    EtagMismatch,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    RateLimited,
    SessionRevoked,
    Unauthenticated,
)
from switchboard.platform.events.bus import EventBus
from switchboard.platform.security.authenticator import CredentialAuthenticator
from switchboard.platform.security.credentials.accesstokens import AccessTokens
from switchboard.platform.security.credentials.opaque import OpaqueSecrets, looks_like_refresh_token
from switchboard.platform.security.policy import ALL_SCOPES, AuthMethod, Principal, Scope
from switchboard.platform.store.outbox import Staged
from switchboard.platform.store.pagination import (
    ID,
    MICROS,
    PageTokens,
    fingerprint,
    from_micros,
    micros,
    page_size,
)
from switchboard.platform.values import names, timefields
from switchboard.platform.values.names import etag_version
from switchboard.platform.values.resources import (
    ApiKeyName,
    AssistantName,
    SessionName,
    UserName,
)

log = logging.getLogger("switchboard.security")

_T = TypeVar("_T")
#: What a page of sessions or API keys is made of (keyed by (created_at, id)).
_Keyed = TypeVar("_Keyed", SessionRecord, ApiKeyRecord)
_Named = TypeVar("_Named", SessionName, ApiKeyName)

MAX_EMAIL = 254
MAX_DISPLAY_NAME = 200
MAX_USER_AGENT = 256
MAX_DEVICE_NAME = 128
MAX_PASSWORD_BYTES = 1024
MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 50
SESSION_SCOPES = frozenset(Scope)
DEFAULT_API_KEY_SCOPES = frozenset({Scope.READ, Scope.WRITE})
# Refusals say what to do. A login refusal never says which of the two was wrong:
# that would tell a guesser which emails have accounts.
INVALID_LOGIN = "invalid email or password"
REFRESH_MALFORMED = (
    "refresh_token is not a refresh token (sbr_..., from Register, Login or the last "
    "RefreshToken); sign in again"
)
REFRESH_INVALID = (
    "the refresh token is not valid (unknown here, or its session has ended or expired); "
    "sign in again"
)
REFRESH_REUSED = (
    "this refresh token was already used, so a copy of it may be in other hands: the "
    "session has been revoked; sign in again"
)
ACCOUNT_GONE = "the account behind this credential no longer exists; register again"


@dataclass(frozen=True)
class ClientContext:
    """What we know of the client making a credential request."""

    address: str
    user_agent: str = ""
    device_name: str = ""


@dataclass(frozen=True)
class SignIn:
    """A new session: who it is for, the session, and its tokens (shown once)."""

    user: UserRecord
    identities: list[IdentityRecord]
    session: SessionRecord
    tokens: auth_pb2.TokenPair


@dataclass(frozen=True)
class LoginLimits:
    """Fixed-window limits on sign-in, counted in the shared cache.

    A password guess is throttled per account *and* address first, so an
    attacker who hammers an account from one place cannot lock its owner out
    from another; the account-wide ceiling is higher and bounds what many
    addresses together may try. Every attempt also counts for its address.
    """

    window_s: int
    #: Failed password checks of one account from all addresses together.
    max_failures_per_account: int
    max_attempts_per_address: int
    #: Failed password checks of one account from one address.
    max_failures_per_account_address: int = 10


@dataclass(frozen=True)
class AccountLimits:
    refresh_ttl_s: int
    max_sessions_per_user: int
    max_api_keys_per_user: int


def normalize_email(raw: str, field: str = "email") -> str:
    email = unicodedata.normalize("NFKC", raw).strip().lower()
    local, at, domain = email.partition("@")
    problem = ""
    if not email:
        problem = "is required"
    elif len(email) > MAX_EMAIL:
        problem = f"must be at most {MAX_EMAIL} characters"
    elif not at or not local or "." not in domain or "@" in domain:
        problem = "is not an email address"
    elif any(c.isspace() or unicodedata.category(c).startswith("C") for c in email):
        problem = "must not contain spaces or control characters"
    if problem:
        raise InvalidArgument(f"{field} {problem}", [FieldViolation(field, problem)])
    return email


def clean_display_name(raw: str, field: str) -> str:
    name = unicodedata.normalize("NFKC", raw).strip()
    problem = ""
    if len(name) > MAX_DISPLAY_NAME:
        problem = f"must be at most {MAX_DISPLAY_NAME} characters"
    elif any(unicodedata.category(c).startswith("C") for c in name):
        problem = "must not contain control characters"
    if problem:
        raise InvalidArgument(f"{field} {problem}", [FieldViolation(field, problem)])
    return name


def _client(address: str, info: auth_pb2.ClientInfo | None = None) -> ClientContext:
    """The client of a credential request: its address (from the transport) and
    what it says of itself, each cut to what a session stores."""
    return ClientContext(
        address=address[:128],
        user_agent=info.user_agent[:MAX_USER_AGENT] if info is not None else "",
        device_name=info.device_name[:MAX_DEVICE_NAME] if info is not None else "",
    )


def _named(kind: type[_Named], name: str, field: str) -> _Named:
    # The access interceptor already checked the name belongs to the caller;
    # this only reads the child id (and rejects other shapes).
    found = kind.parse_or_none(name)
    if found is None:
        raise InvalidArgument(f"{field} is malformed", [FieldViolation(field, "malformed name")])
    return found


def _hash_key(value: str) -> str:
    # Cache keys must not carry emails or addresses in the clear.
    return hashlib.sha256(value.encode()).hexdigest()[:32]


def throttle_address(address: str) -> str:
    """The unit an address is throttled as: an IPv4 address, or an IPv6 /64.

    One IPv6 client commonly holds a whole /64, so counting single addresses
    would let it rotate past every per-address limit. An IPv4 address that
    reached us as IPv4-mapped IPv6 counts as itself.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # not an IP (a Unix socket peer): itself
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class Security:
    """One security event: a structured log line, and an event when a user is concerned."""

    kind: events_pb2.SecurityEventKind.ValueType
    user_id: str
    session_id: str = ""
    api_key_id: str = ""
    client: ClientContext | None = None
    #: For the log line only.
    detail: str = ""

    def log(self) -> None:
        name = events_pb2.SecurityEventKind.Name(self.kind).removeprefix("SECURITY_EVENT_KIND_")
        client = self.client
        log.info(
            "security event",
            extra={
                "event": name.lower(),
                "user": self.user_id,
                "session": self.session_id,
                "key_id": self.api_key_id,
                "client_address": client.address if client else "",
                "detail": self.detail,
            },
        )

    def event(self) -> events_pb2.Event | None:
        if not self.user_id:
            return None
        user = str(UserName(self.user_id))
        client = self.client
        payload = events_pb2.SecurityEvent(
            kind=self.kind,
            session=str(SessionName(self.user_id, self.session_id)) if self.session_id else "",
            api_key=str(ApiKeyName(self.user_id, self.api_key_id)) if self.api_key_id else "",
            client_address=client.address if client else "",
        )
        if client is not None:
            payload.client_info.CopyFrom(
                auth_pb2.ClientInfo(user_agent=client.user_agent, device_name=client.device_name)
            )
        return events_pb2.Event(
            type=events_pb2.EVENT_TYPE_SECURITY,
            actor=events_pb2.Actor(name=user),
            user=user,
            security=payload,
        )


class Audit(Generic[_T]):
    """The security events of one write (``platform/store/outbox.py``): built from its
    result and written in its transaction (pass ``staged`` to the store), then
    logged and published after the commit (``done``). A crash in between loses
    nothing: the outbox relay of any process publishes what was written.
    """

    def __init__(self, bus: EventBus, notes: Callable[[_T], Iterable[Security]]) -> None:
        self._bus = bus
        self._notes = notes
        self._taken: list[Security] = []
        self.staged: Staged[_T] = Staged(bus.outbox, self._build)

    def _build(self, result: _T) -> list[events_pb2.Event]:
        self._taken = list(self._notes(result))
        return [event for note in self._taken if (event := note.event()) is not None]

    async def done(self) -> None:
        """After the commit: log each event, publish them (never raises; see publish_staged)."""
        for note in self._taken:
            note.log()
        await self._bus.publish_staged(self.staged.events)


class Accounts:
    """The auth service's domain: one method per RPC, request in, response out."""

    def __init__(
        self,
        *,
        store: AuthStore,
        hasher: PasswordHasher,
        tokens: AccessTokens,
        secrets: OpaqueSecrets,
        authenticator: CredentialAuthenticator,
        cache: Cache,
        bus: EventBus,
        oidc: OidcVerifier | None,
        login_limits: LoginLimits,
        limits: AccountLimits,
        page_tokens: PageTokens,
    ) -> None:
        self._store = store
        self._pages = page_tokens
        self._hasher = hasher
        self._tokens = tokens
        self._secrets = secrets
        self._authenticator = authenticator
        self._cache = cache
        self._bus = bus
        self._oidc = oidc
        self._login_limits = login_limits
        self._limits = limits
        # The signing keys are fixed for the process's life: the answer is built once.
        self._jwks = mapping.jwks(tokens.keys)
        self.deletion = AccountDeletion(
            store, bus.outbox, announce=authenticator.announce, publish=bus.publish_staged
        )

    # Security events: a structured log line always, an event when a user is concerned.

    def _audit(self, notes: Callable[[_T], Iterable[Security]]) -> Audit[_T]:
        return Audit(self._bus, notes)

    async def _security(self, note: Security) -> None:
        """A security event that comes with no write (a failed sign-in): published now."""
        note.log()
        event = note.event()
        if event is not None:
            await self._bus.publish(event)

    # Rate limits.

    async def _limit(self, key: str, limit: int, message: str) -> None:
        count, reset_s = await self._cache.hit(key, self._login_limits.window_s)
        if count > limit:
            raise RateLimited(message, retry_after_s=max(reset_s, 1.0))

    async def _limit_address(self, client: ClientContext) -> None:
        await self._limit(
            f"login:addr:{_hash_key(throttle_address(client.address))}",
            self._login_limits.max_attempts_per_address,
            "too many sign-in attempts from this address",
        )

    async def _limit_password_checks(self, email: str, client: ClientContext) -> tuple[str, ...]:
        """Count a password check against the account from this address, then overall.

        Counted before the check, atomically in the cache, so parallel guesses
        cannot slip past a limit; a correct password resets both counts (they
        count failures since the last success). In that order: attempts from a
        pair that is already throttled do not spend the account-wide budget.
        Returns the keys to reset.
        """
        pair = f"login:pair:{_hash_key(email + chr(0) + throttle_address(client.address))}"
        account = f"login:acct:{_hash_key(email)}"
        await self._limit(
            pair,
            self._login_limits.max_failures_per_account_address,
            "too many failed sign-in attempts for this account from this address",
        )
        await self._limit(
            account,
            self._login_limits.max_failures_per_account,
            "too many failed sign-in attempts for this account",
        )
        return pair, account

    # Sign-in.

    async def start_session(
        self,
        user: UserRecord | NewUser,
        method: AuthMethod,
        client: ClientContext,
        *,
        signed_in: str | None = None,
    ) -> SignIn:
        """A new session for ``user``; with ``signed_in`` (the event's detail), its
        LOGIN_SUCCEEDED event written with it. Sessions evicted to make room
        have their SESSION_REVOKED written with it either way. A ``NewUser`` is
        created in the session's transaction: never an account without it."""
        new_user = user if isinstance(user, NewUser) else None
        if isinstance(user, NewUser):
            user = user.user
        user_id = user.id
        refresh = self._secrets.new_refresh_token()
        expires = names.now() + dt.timedelta(seconds=self._limits.refresh_ttl_s)

        def notes(result: tuple[SessionRecord, list[str]]) -> list[Security]:
            session, evicted = result
            revoked = events_pb2.SECURITY_EVENT_KIND_SESSION_REVOKED
            found = [
                Security(revoked, user_id, session_id=ident, detail="session_limit")
                for ident in evicted
            ]
            if signed_in is not None:
                found.append(
                    Security(
                        events_pb2.SECURITY_EVENT_KIND_LOGIN_SUCCEEDED,
                        user_id,
                        session_id=session.id,
                        client=client,
                        detail=signed_in,
                    )
                )
            return found

        audit = self._audit(notes)
        session, evicted = await self._store.create_session(
            user_id=user_id,
            auth_method=method.value,
            user_agent=client.user_agent,
            device_name=client.device_name,
            client_address=client.address,
            expires_at=expires,
            refresh_digest=refresh.digest,
            max_sessions=self._limits.max_sessions_per_user,
            new_user=new_user,
            staged=audit.staged,
        )
        for session_id in evicted:
            await self._authenticator.announce("session", session_id)
        await audit.done()
        access, claims = self._tokens.issue(
            subject=user_id, session=session.id, scopes=[s.value for s in SESSION_SCOPES]
        )
        tokens = mapping.token_pair(
            access,
            dt.datetime.fromtimestamp(claims.expires_at, dt.UTC),
            refresh.secret,
            expires,
        )
        identities = await self._store.federated_identities(user_id)
        return SignIn(user, identities, session, tokens)

    async def _signed_in(
        self,
        user: UserRecord | NewUser,
        method: AuthMethod,
        client: ClientContext,
        detail: str = "",
    ) -> SignIn:
        return await self.start_session(user, method, client, signed_in=detail)

    async def register(
        self, request: auth_pb2.RegisterRequest, address: str
    ) -> auth_pb2.RegisterResponse:
        """A new account signed in; ``address`` is the client's (``platform/rpc/clientaddr.py``)."""
        client = _client(address, request.client_info)
        password = request.password
        violations: list[FieldViolation] = []
        normalized = ""
        name = ""
        try:
            normalized = normalize_email(request.email)
        except InvalidArgument as exc:
            violations.extend(exc.violations)
        try:
            name = clean_display_name(request.display_name, "display_name")
        except InvalidArgument as exc:
            violations.extend(exc.violations)
        if len(password.encode()) > MAX_PASSWORD_BYTES:
            violations.append(
                FieldViolation("password", f"must be at most {MAX_PASSWORD_BYTES} bytes")
            )
        else:
            try:
                check_password_policy(password, email=normalized)
            except InvalidArgument as exc:
                violations.extend(exc.violations)
        if violations:
            raise InvalidArgument("the registration is invalid", violations)
        # Hashing is the expensive part: registrations count against the address limit.
        await self._limit_address(client)
        password_hash = await self._hasher.hash(password)
        new = self._store.new_user(normalized, name, password_hash)
        found = await self._signed_in(new, AuthMethod.PASSWORD, client, "registered")
        return auth_pb2.RegisterResponse(
            user=mapping.user(found.user, found.identities),
            tokens=found.tokens,
            session=mapping.session(found.session, found.session.id),
        )

    async def login(self, request: auth_pb2.LoginRequest, address: str) -> auth_pb2.LoginResponse:
        """A new session for a password or a federated ID token."""
        client = _client(address, request.client_info)
        which = request.WhichOneof("credential")
        if which == "password":
            found = await self._login_password(
                request.password.email, request.password.password, client
            )
        elif which == "oidc":
            found = await self._login_oidc(request.oidc.id_token, client)
        else:
            raise InvalidArgument(
                "a credential is required",
                [FieldViolation("credential", "set password or oidc")],
            )
        return auth_pb2.LoginResponse(
            user=mapping.user(found.user, found.identities),
            tokens=found.tokens,
            session=mapping.session(found.session, found.session.id),
        )

    async def _login_password(self, email: str, password: str, client: ClientContext) -> SignIn:
        if not email or not password:
            missing = [
                f for f, v in (("password.email", email), ("password.password", password)) if not v
            ]
            raise InvalidArgument(
                "email and password are required",
                [FieldViolation(f, "is required") for f in missing],
            )
        if len(password.encode()) > MAX_PASSWORD_BYTES or len(email) > MAX_EMAIL * 4:
            raise Unauthenticated(INVALID_LOGIN)
        await self._limit_address(client)
        try:
            normalized = normalize_email(email, "password.email")
        except InvalidArgument:
            normalized = email.strip().lower()
        counted = await self._limit_password_checks(normalized, client)
        user = await self._store.user_by_email(normalized)
        stored = user.password_hash if user is not None else None
        # Unknown user and wrong password take the same path and time.
        if not await self._hasher.verify(stored, password) or user is None or stored is None:
            # No write to stage it with, and a guess must stay cheap: published directly.
            await self._security(
                Security(
                    events_pb2.SECURITY_EVENT_KIND_LOGIN_FAILED,
                    user.id if user is not None else "",
                    client=client,
                    detail="bad password",
                )
            )
            raise Unauthenticated(INVALID_LOGIN)
        for key in counted:
            await self._cache.clear(key)
        if self._hasher.needs_rehash(stored):
            await self._store.set_password_hash(user.id, await self._hasher.hash(password))
        return await self._signed_in(user, AuthMethod.PASSWORD, client)

    async def _login_oidc(self, id_token: str, client: ClientContext) -> SignIn:
        if self._oidc is None:
            raise FailedPrecondition("federated login is not configured on this deployment")
        if not id_token:
            raise InvalidArgument(
                "oidc.id_token is required", [FieldViolation("oidc.id_token", "is required")]
            )
        await self._limit_address(client)
        identity = self._oidc.verify(id_token)
        user = await self._store.user_by_federated_identity(identity.issuer, identity.subject)
        if user is not None:
            return await self._signed_in(user, AuthMethod.OIDC, client, "oidc")
        # First sight: a new local user, created with its first session. We never
        # link to an existing account by email, which would let whoever controls
        # the issuer take it over.
        if not identity.email or not identity.email_verified:
            raise FailedPrecondition("the ID token carries no verified email")
        email = normalize_email(identity.email, "oidc.id_token")
        name = clean_display_name(identity.name[:MAX_DISPLAY_NAME], "oidc.id_token")
        new = self._store.new_user(email, name, None, identity=(identity.issuer, identity.subject))
        try:
            return await self._signed_in(new, AuthMethod.OIDC, client, "oidc")
        except AlreadyExists:
            # A concurrent first sign-in with the same identity created the user: join it.
            user = await self._store.user_by_federated_identity(identity.issuer, identity.subject)
            if user is None:
                raise  # the email belongs to another account
            return await self._signed_in(user, AuthMethod.OIDC, client, "oidc")

    async def refresh(
        self, request: auth_pb2.RefreshTokenRequest, address: str
    ) -> auth_pb2.RefreshTokenResponse:
        """New tokens for a refresh token, which is spent; presenting a spent one
        again revokes its whole session (reuse detection)."""
        client = _client(address)
        refresh_token = request.refresh_token
        if not refresh_token:
            raise InvalidArgument(
                "refresh_token is required", [FieldViolation("refresh_token", "is required")]
            )
        if not looks_like_refresh_token(refresh_token):
            raise Unauthenticated(REFRESH_MALFORMED)
        new = self._secrets.new_refresh_token()

        def notes(result: Redemption) -> list[Security]:
            reused = result.session
            if result.outcome != "reused" or reused is None:
                return []
            return [
                Security(
                    events_pb2.SECURITY_EVENT_KIND_REFRESH_REUSE_DETECTED,
                    reused.user_id,
                    session_id=reused.id,
                    client=client,
                )
            ]

        # A spent token that comes back means someone holds a copy: the store
        # ends the whole family in the transaction that detects it.
        audit = self._audit(notes)
        result = await self._store.redeem_refresh_token(
            self._secrets.digest(refresh_token), new.digest, names.now(), audit.staged
        )
        session = result.session
        if result.outcome == "reused" and session is not None:
            await self._authenticator.announce("session", session.id)
            await audit.done()
            raise SessionRevoked(REFRESH_REUSED)
        if result.outcome != "rotated" or session is None:
            raise Unauthenticated(REFRESH_INVALID)
        access, claims = self._tokens.issue(
            subject=session.user_id, session=session.id, scopes=[s.value for s in SESSION_SCOPES]
        )
        return auth_pb2.RefreshTokenResponse(
            tokens=mapping.token_pair(
                access,
                dt.datetime.fromtimestamp(claims.expires_at, dt.UTC),
                new.secret,
                session.expires_at,
            )
        )

    # Sessions.

    async def _revoke(self, principal: Principal, session_id: str, reason: str) -> SessionRecord:
        revoked = Security(
            events_pb2.SECURITY_EVENT_KIND_SESSION_REVOKED,
            principal.user_id,
            session_id=session_id,
            detail=reason,
        )
        audit: Audit[SessionRecord | None] = self._audit(lambda record: [revoked] if record else [])
        record = await self._store.revoke_session(
            principal.user_id, session_id, reason, audit.staged
        )
        if record is None:
            raise NotFound(f"{SessionName(principal.user_id, session_id)} not found")
        await self._authenticator.announce("session", session_id)
        await audit.done()
        return record

    async def logout(self, principal: Principal) -> auth_pb2.LogoutResponse:
        """End the caller's own session."""
        if not principal.session_id:
            raise FailedPrecondition("API keys have no session to log out of; revoke the key")
        await self._revoke(principal, principal.session_id, "logout")
        return auth_pb2.LogoutResponse()

    async def revoke_session(
        self, principal: Principal, request: auth_pb2.RevokeSessionRequest
    ) -> auth_pb2.RevokeSessionResponse:
        session_id = _named(SessionName, request.name, "name").session
        record = await self._revoke(principal, session_id, "revoked")
        return auth_pb2.RevokeSessionResponse(session=mapping.session(record, principal.session_id))

    async def revoke_all_sessions(
        self, principal: Principal, request: auth_pb2.RevokeAllSessionsRequest
    ) -> auth_pb2.RevokeAllSessionsResponse:
        keep = principal.session_id if request.keep_current else ""
        audit: Audit[list[str]] = self._audit(
            lambda ids: [
                Security(
                    events_pb2.SECURITY_EVENT_KIND_SESSION_REVOKED,
                    principal.user_id,
                    session_id=session_id,
                    detail="revoke_all",
                )
                for session_id in ids
            ]
        )
        revoked = await self._store.revoke_all_sessions(
            principal.user_id, keep, "revoke_all", audit.staged
        )
        if revoked:
            await self._authenticator.announce("user", principal.user_id)
        await audit.done()
        return auth_pb2.RevokeAllSessionsResponse(revoked_count=len(revoked))

    async def list_sessions(
        self, principal: Principal, request: auth_pb2.ListSessionsRequest
    ) -> auth_pb2.ListSessionsResponse:
        limit = page_size(request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        filters = fingerprint("sessions", principal.user_id, request.show_inactive)
        records = await self._store.list_sessions(
            principal.user_id,
            show_inactive=request.show_inactive,
            limit=limit + 1,
            after=self._after(request.page_token, filters),
        )
        page, next_page_token = self._page(records, limit, filters)
        return auth_pb2.ListSessionsResponse(
            sessions=[mapping.session(record, principal.session_id) for record in page],
            next_page_token=next_page_token,
        )

    # Paging: keyset tokens on (created_at, id), bound to the request's filters.

    def _after(self, token: str, filters: str) -> Keyset | None:
        if not token:
            return None
        stamp, last = self._pages.decode(token, filters, (MICROS, ID))
        return from_micros(stamp), str(last)

    def _page(self, records: list[_Keyed], limit: int, filters: str) -> tuple[list[_Keyed], str]:
        """The first ``limit`` of ``records`` (one more was asked for) and the next page's token."""
        if len(records) <= limit:
            return records, ""
        last = records[limit - 1]
        return records[:limit], self._pages.encode([micros(last.created_at), last.id], filters)

    # API keys.

    async def create_api_key(
        self, principal: Principal, request: auth_pb2.CreateApiKeyRequest
    ) -> auth_pb2.CreateApiKeyResponse:
        expires_at = (
            timefields.timestamp(request.expire_time, "expire_time")
            if request.HasField("expire_time")
            else None
        )
        violations: list[FieldViolation] = []
        name = ""
        try:
            name = clean_display_name(request.display_name, "display_name")
        except InvalidArgument as exc:
            violations.extend(exc.violations)
        requested = list(request.scopes)
        unknown = sorted(set(requested) - {s.value for s in ALL_SCOPES})
        if unknown:
            violations.append(
                FieldViolation(
                    "scopes", f"unknown scopes {unknown}; choose from read, write, manage"
                )
            )
        chosen = (
            frozenset(Scope(s) for s in requested if s not in unknown) or DEFAULT_API_KEY_SCOPES
        )
        if not chosen <= principal.scopes:
            violations.append(FieldViolation("scopes", "cannot exceed the caller's own scopes"))
        if expires_at is not None and expires_at <= names.now():
            violations.append(FieldViolation("expire_time", "must be in the future"))
        pinned = _assistant_pins(request.assistant_pins, violations)
        if violations:
            raise InvalidArgument("the API key request is invalid", violations)
        key_id, issued = self._secrets.new_api_key()
        created = Security(
            events_pb2.SECURITY_EVENT_KIND_API_KEY_CREATED, principal.user_id, api_key_id=key_id
        )
        audit: Audit[ApiKeyRecord | None] = self._audit(lambda record: [created] if record else [])
        record = await self._store.create_api_key(
            key_id=key_id,
            user_id=principal.user_id,
            display_name=name,
            digest=issued.digest,
            scopes=" ".join(sorted(s.value for s in chosen)),
            expires_at=expires_at,
            max_keys=self._limits.max_api_keys_per_user,
            staged=audit.staged,
            assistant_pins=pinned,
        )
        if record is None:
            raise QuotaExceeded(
                f"at most {self._limits.max_api_keys_per_user} live API keys per user",
                subject="api_keys_per_user",
            )
        await audit.done()
        return auth_pb2.CreateApiKeyResponse(api_key=mapping.api_key(record), secret=issued.secret)

    async def list_api_keys(
        self, principal: Principal, request: auth_pb2.ListApiKeysRequest
    ) -> auth_pb2.ListApiKeysResponse:
        limit = page_size(request.page_size, default=DEFAULT_PAGE_SIZE, maximum=MAX_PAGE_SIZE)
        filters = fingerprint("api-keys", principal.user_id, request.show_inactive)
        records = await self._store.list_api_keys(
            principal.user_id,
            show_inactive=request.show_inactive,
            limit=limit + 1,
            after=self._after(request.page_token, filters),
        )
        page, next_page_token = self._page(records, limit, filters)
        return auth_pb2.ListApiKeysResponse(
            api_keys=[mapping.api_key(record) for record in page],
            next_page_token=next_page_token,
        )

    async def revoke_api_key(
        self, principal: Principal, request: auth_pb2.RevokeApiKeyRequest
    ) -> auth_pb2.RevokeApiKeyResponse:
        key_id = _named(ApiKeyName, request.name, "name").key
        revoked = Security(
            events_pb2.SECURITY_EVENT_KIND_API_KEY_REVOKED, principal.user_id, api_key_id=key_id
        )
        audit: Audit[ApiKeyRecord | None] = self._audit(lambda record: [revoked] if record else [])
        record = await self._store.revoke_api_key(principal.user_id, key_id, audit.staged)
        if record is None:
            raise NotFound(f"{ApiKeyName(principal.user_id, key_id)} not found")
        await self._authenticator.announce("apikey", key_id)
        await audit.done()
        return auth_pb2.RevokeApiKeyResponse(api_key=mapping.api_key(record))

    # The caller and their user record.

    async def get_principal(self, principal: Principal) -> auth_pb2.GetPrincipalResponse:
        """Who the caller is, and their user."""
        user = await self._store.user_by_id(principal.user_id)
        if user is None:
            raise Unauthenticated(ACCOUNT_GONE)
        identities = await self._store.federated_identities(user.id)
        return auth_pb2.GetPrincipalResponse(
            principal=mapping.principal(principal), user=mapping.user(user, identities)
        )

    async def update_user(
        self, principal: Principal, request: auth_pb2.UpdateUserRequest
    ) -> auth_pb2.UpdateUserResponse:
        """Update the caller's display name, the one field a user may change."""
        paths = list(request.update_mask.paths)
        unsupported = [p for p in paths if p != "display_name"]
        if not paths or unsupported:
            raise InvalidArgument(
                "update_mask must list only display_name",
                [FieldViolation("update_mask", f"updatable: display_name; got {paths}")],
            )
        name = clean_display_name(request.user.display_name, "user.display_name")
        expected: int | None = None
        if request.user.etag:
            expected = etag_version(request.user.etag)
            if expected is None:
                raise InvalidArgument(
                    "user.etag is invalid", [FieldViolation("user.etag", "not an etag we issued")]
                )
        user = await self._store.update_display_name(principal.user_id, name, expected)
        if user is None:
            raise EtagMismatch("the user changed since it was read; re-read and retry")
        identities = await self._store.federated_identities(user.id)
        return auth_pb2.UpdateUserResponse(user=mapping.user(user, identities))

    def jwks(self) -> auth_pb2.GetJwksResponse:
        """The public keys access tokens are signed with (RFC 7517)."""
        return self._jwks


#: Assistants one API key may pin (ApiKey.assistant_pins).
MAX_ASSISTANT_PINS: Final = 16


def _assistant_pins(
    given: Sequence[auth_pb2.ApiKeyAssistantPin], violations: list[FieldViolation]
) -> tuple[tuple[str, int], ...]:
    """The pins in form: names of assistants, each once, at a revision of 1 or more.
    Whether each exists is the dispatcher's to say when a message uses the key (the
    auth service does not hold assistants)."""
    if len(given) > MAX_ASSISTANT_PINS:
        violations.append(
            FieldViolation("assistant_pins", f"may pin at most {MAX_ASSISTANT_PINS} assistants")
        )
        return ()
    pinned: list[tuple[str, int]] = []
    for index, pin in enumerate(given):
        field = f"assistant_pins[{index}]"
        if AssistantName.parse_or_none(pin.assistant) is None:
            violations.append(
                FieldViolation(f"{field}.assistant", "must be workspaces/{w}/assistants/{a}")
            )
        elif any(name == pin.assistant for name, _ in pinned):
            violations.append(FieldViolation(f"{field}.assistant", "is pinned twice"))
        if not names.is_revision(pin.revision):
            violations.append(FieldViolation(f"{field}.revision", "must be 1 or more"))
        pinned.append((pin.assistant, pin.revision))
    return tuple(pinned)

"""The push-config methods: A2A's ``TaskPushNotificationConfig`` as a per-task webhook.

A config is validated, authorized and stored here, in whichever process
serves the A2A front door; it lives in the shared database (``store.py``),
and the integration service's webhook engine delivers it (``delivery.py``
says what it sends).

The access rules are the task's: creating or deleting a config is WRITE on
the run (like ``CancelRun``), reading or listing READ. ``token`` and
``authentication.credentials`` are sealed at rest and write-only: never
returned, logged or put in an event.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable
from typing import Final, Protocol

from a2a.types import a2a_pb2 as a2a
from switchboard.a2a import mapping
from switchboard.a2a.push.delivery import SIGNING_SCHEME, purpose
from switchboard.a2a.push.store import Backfill, PushConfig, PushStore
from switchboard.api.dispatcher.v1 import dispatcher_pb2 as pb
from switchboard.api.events.v1 import events_pb2
from switchboard.platform.errors import (
    AlreadyExists,
    DestinationBlocked,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    Violations,
)
from switchboard.platform.security.credentials.secretbox import SecretBox
from switchboard.platform.security.egress import (
    PLAIN_HTTP_REFUSED,
    EgressPolicy,
    ResolutionFailed,
    check_host,
    parse_http_endpoint,
)
from switchboard.platform.security.policy import Permission, Policy, Principal
from switchboard.platform.store import pagination
from switchboard.platform.values import names
from switchboard.platform.values.resources import RunName, WorkspaceName

#: Configs one task may have.
MAX_PER_TASK: Final = 10
MAX_TOKEN_CHARS: Final = 512
MAX_CREDENTIALS_CHARS: Final = 4096
MAX_PAGE: Final = 100
DEFAULT_PAGE: Final = 10
#: A name lookup of the config's host when it is created.
RESOLVE_TIMEOUT_S: Final = 5.0
#: How long reading the task's earlier status changes may take before the config
#: starts from the task's current status instead.
BACKFILL_TIMEOUT_S: Final = 10.0
#: A config id: as a message id (a UUID fits).
CONFIG_ID: Final = names.REQUEST_ID
#: An HTTP authentication scheme name (RFC 9110 token, kept short).
_SCHEME: Final = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")
#: What may go in an HTTP header value: visible ASCII and spaces.
_HEADER_SAFE: Final = re.compile(r"[\x20-\x7e]*")
_WHSEC: Final = re.compile(r"whsec_([A-Za-z0-9+/=]{16,200})")
_ENDED: Final = frozenset({pb.RUN_STATE_SUCCEEDED, pb.RUN_STATE_FAILED, pb.RUN_STATE_CANCELLED})
_PAGE_KEY: Final = pagination.Text(CONFIG_ID)


class RunReader(Protocol):
    """What configs need of the dispatcher (``frontdoor.Runs`` has it)."""

    def get_run(self, principal: Principal, name: str) -> Awaitable[pb.Run]: ...

    def watch(
        self, principal: Principal, name: str, after_sequence: int
    ) -> AsyncIterator[pb.RunUpdate | None]: ...


def _invalid(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(f"{field} {description}", [FieldViolation(field, description)])


class PushConfigs:
    """The four push-config methods and a send's ``task_push_notification_config``."""

    def __init__(
        self,
        store: PushStore,
        runs: RunReader,
        policy: Policy,
        secrets: SecretBox,
        egress: EgressPolicy,
        page_tokens: pagination.PageTokens,
        *,
        allow_plain_http: bool,
    ) -> None:
        self._store = store
        self._runs = runs
        self._policy = policy
        self._secrets = secrets
        self._egress = egress
        self._pages = page_tokens
        self._allow_plain_http = allow_plain_http

    # -- the methods ------------------------------------------------------------------------

    async def create(
        self, principal: Principal, config: a2a.TaskPushNotificationConfig
    ) -> a2a.TaskPushNotificationConfig:
        name = str(mapping.run_name(mapping.agent(config.tenant).parent, config.task_id, "task_id"))
        await self._policy.authorize(principal, name, Permission.WRITE, "task_id")
        run = await self._runs.get_run(principal, name)
        return await self.attach(principal, config, run, prefix="")

    async def attach(
        self,
        principal: Principal,
        config: a2a.TaskPushNotificationConfig,
        run: pb.Run,
        *,
        prefix: str,
        default_id: str = "",
    ) -> a2a.TaskPushNotificationConfig:
        """Store ``config`` for ``run`` (authorized by the caller) and record the task's
        status so far for it; ``prefix`` names where the config sits in the request.

        ``default_id`` (a send's message id) makes a send's config idempotent: a
        replayed send finds its config stored and answers it.
        """
        await self.validate(config, prefix)
        found = RunName.parse_or_none(run.name)
        if found is None:  # pragma: no cover - runs' names come from the dispatcher
            raise ValueError(run.name)
        workspace_id, conversation_id, run_id = found.workspace, found.conversation, found.run
        config_id = config.id or default_id or names.new_id()
        endpoint_id = PushStore.new_endpoint_id()
        scheme = config.authentication.scheme if config.HasField("authentication") else ""
        credentials = config.authentication.credentials if scheme else ""
        stored = await self._store.create(
            workspace_id,
            conversation_id,
            run_id,
            config_id,
            endpoint_id=endpoint_id,
            url=config.url,
            token=self._seal(config.token, workspace_id, endpoint_id, "token"),
            auth_scheme=scheme,
            credentials=self._seal(credentials, workspace_id, endpoint_id, "credentials"),
            creator=principal.user_name,
            limit=MAX_PER_TASK,
        )
        if stored == "exists" and default_id:
            again = await self._store.get(workspace_id, conversation_id, run_id, config_id)
            if again is not None:
                tenant = config.tenant or mapping.tenant_of(run.assistant)
                return self._message(again, tenant=tenant)
        if stored == "exists":
            raise AlreadyExists(
                f"task {mapping.task_id(run.name)} has a push config {config_id!r}; delete it "
                "first to replace it"
            )
        if stored == "limit":
            raise QuotaExceeded(
                f"task {mapping.task_id(run.name)} has {MAX_PER_TASK} push configs, the most a "
                "task may have",
                subject="push_configs_per_task",
            )
        if not isinstance(stored, PushConfig):  # pragma: no cover - the reasons are above
            raise TypeError(stored)
        try:
            earlier = await self._earlier(principal, run.name, workspace_id)
            await self._store.ready(workspace_id, endpoint_id, earlier)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._store.discard(workspace_id, endpoint_id))
            raise
        return self._message(stored, tenant=config.tenant or mapping.tenant_of(run.assistant))

    async def get(
        self, principal: Principal, request: a2a.GetTaskPushNotificationConfigRequest
    ) -> a2a.TaskPushNotificationConfig:
        run = mapping.run_name(mapping.agent(request.tenant).parent, request.task_id, "task_id")
        await self._policy.authorize(principal, str(run), Permission.READ, "task_id")
        config_id = self._config_id(request.id)
        found = await self._store.get(run.workspace, run.conversation, run.run, config_id)
        if found is None:
            raise NotFound(f"task {request.task_id} has no push config {config_id!r}")
        return self._message(found, tenant=request.tenant)

    async def list(
        self, principal: Principal, request: a2a.ListTaskPushNotificationConfigsRequest
    ) -> a2a.ListTaskPushNotificationConfigsResponse:
        run = mapping.run_name(mapping.agent(request.tenant).parent, request.task_id, "task_id")
        await self._policy.authorize(principal, str(run), Permission.READ, "task_id")
        size = pagination.page_size(request.page_size, default=DEFAULT_PAGE, maximum=MAX_PAGE)
        fingerprint = pagination.fingerprint("a2a-push-configs", str(run))
        after = ""
        if request.page_token:
            (last,) = self._pages.decode(request.page_token, fingerprint, (_PAGE_KEY,))
            after = str(last)
        found = await self._store.page(run.workspace, run.conversation, run.run, size + 1, after)
        token = ""
        if len(found) > size:
            found = found[:size]
            token = self._pages.encode([found[-1].config_id], fingerprint)
        return a2a.ListTaskPushNotificationConfigsResponse(
            configs=[self._message(item, tenant=request.tenant) for item in found],
            next_page_token=token,
        )

    async def delete(
        self, principal: Principal, request: a2a.DeleteTaskPushNotificationConfigRequest
    ) -> None:
        run = mapping.run_name(mapping.agent(request.tenant).parent, request.task_id, "task_id")
        await self._policy.authorize(principal, str(run), Permission.WRITE, "task_id")
        config_id = self._config_id(request.id)
        if not await self._store.delete(run.workspace, run.conversation, run.run, config_id):
            raise NotFound(f"task {request.task_id} has no push config {config_id!r}")

    # -- helpers ----------------------------------------------------------------------------

    async def validate(self, config: a2a.TaskPushNotificationConfig, prefix: str) -> None:
        """Every malformed field as a violation; then the URL's host through the egress policy."""
        violations = Violations()
        if config.id and not CONFIG_ID.fullmatch(config.id):
            violations.add(f"{prefix}id", "must be 1-64 letters, digits, '-' or '_' (a UUID is)")
        url_field = f"{prefix}url"
        host: tuple[str, int] | None = None
        if not config.url:
            violations.add(url_field, "is required")
        else:
            try:
                endpoint = parse_http_endpoint(config.url, url_field)
            except InvalidArgument as exc:
                violations.items.extend(exc.violations)
            else:
                if endpoint.scheme != "https" and not self._allow_plain_http:
                    violations.add(url_field, PLAIN_HTTP_REFUSED)
                else:
                    host = (endpoint.host, endpoint.port)
        if len(config.token) > MAX_TOKEN_CHARS or not _HEADER_SAFE.fullmatch(config.token):
            violations.add(
                f"{prefix}token",
                f"must be at most {MAX_TOKEN_CHARS} printable ASCII characters (a header value)",
            )
        if config.HasField("authentication"):
            self._authentication(config.authentication, f"{prefix}authentication", violations)
        violations.check()
        if host is None:  # pragma: no cover - a violation was raised above
            return
        try:
            await check_host(*host, self._egress, timeout_s=RESOLVE_TIMEOUT_S)
        except DestinationBlocked as exc:
            violation = FieldViolation(url_field, exc.message)
            raise DestinationBlocked(exc.message, [violation]) from None
        except ResolutionFailed:
            raise _invalid(url_field, "names a host that does not resolve") from None

    @staticmethod
    def _authentication(
        authentication: a2a.AuthenticationInfo, field: str, violations: Violations
    ) -> None:
        scheme, credentials = authentication.scheme, authentication.credentials
        if not _SCHEME.fullmatch(scheme):
            violations.add(
                f"{field}.scheme", "must be an HTTP authentication scheme (Bearer, Basic ...)"
            )
            return
        if scheme.lower() == SIGNING_SCHEME:
            found = _WHSEC.fullmatch(credentials)
            secret = b""
            if found is not None:
                with contextlib.suppress(binascii.Error, ValueError):
                    secret = base64.b64decode(found[1], validate=True)
            if not 24 <= len(secret) <= 64:
                violations.add(
                    f"{field}.credentials",
                    "must be whsec_ followed by 24 to 64 random bytes in base64 "
                    "(the StandardWebhooks signing secret)",
                )
            return
        if len(credentials) > MAX_CREDENTIALS_CHARS or not _HEADER_SAFE.fullmatch(credentials):
            violations.add(
                f"{field}.credentials",
                f"must be at most {MAX_CREDENTIALS_CHARS} printable ASCII characters",
            )

    @staticmethod
    def _config_id(config_id: str) -> str:
        if not config_id:
            raise _invalid("id", "is required")
        if not CONFIG_ID.fullmatch(config_id):
            raise _invalid("id", "is not a push config id")
        return config_id

    def _seal(self, value: str, workspace_id: str, endpoint_id: str, part: str) -> bytes | None:
        if not value:
            return None
        return self._secrets.seal(value, purpose=purpose(workspace_id, endpoint_id, part))

    async def _earlier(
        self, principal: Principal, run: str, workspace_id: str
    ) -> builtins.list[Backfill]:
        """The task's status changes up to now, as the run still keeps them (a run that
        ended long ago, or one this cannot follow in time: its current status only).

        Read after the config was stored: every change the feeder may have passed
        over before that is at most the run's sequence now, so it is here.
        """
        current = await self._runs.get_run(principal, run)
        target = current.last_sequence
        found: list[pb.RunUpdate] = []

        async def follow() -> None:
            updates = self._runs.watch(principal, run, 0)
            try:
                async for update in updates:
                    if update is None:
                        continue
                    if update.WhichOneof("update") == "state_change":
                        found.append(update)
                    if update.sequence >= target:
                        return
            finally:
                aclose = getattr(updates, "aclose", None)
                if aclose is not None:
                    await aclose()

        try:
            async with asyncio.timeout(BACKFILL_TIMEOUT_S):
                await follow()
        except TimeoutError:
            found = []
        if not found:
            snapshot = pb.RunUpdate(run=run, sequence=target)
            snapshot.state_change.run.CopyFrom(current)
            found = [snapshot]
        return [self._backfill(workspace_id, update) for update in found]

    @staticmethod
    def _backfill(workspace_id: str, update: pb.RunUpdate) -> Backfill:
        event = events_pb2.Event(
            id=names.new_id(),
            type=events_pb2.EVENT_TYPE_RUN_UPDATED,
            workspace=str(WorkspaceName(workspace_id)),
        )
        event.run_updated.update.CopyFrom(update)
        event.time.GetCurrentTime()
        return Backfill(
            sequence=update.sequence,
            event_id=str(update.sequence),
            data=event.SerializeToString(),
            final=update.state_change.run.state in _ENDED,
        )

    @staticmethod
    def _message(config: PushConfig, *, tenant: str) -> a2a.TaskPushNotificationConfig:
        """The config as A2A returns it: ``token`` and ``credentials`` left out (write-only)."""
        found = a2a.TaskPushNotificationConfig(
            tenant=tenant,
            id=config.config_id,
            task_id=f"{config.conversation_id}.{config.run_id}",
            url=config.url,
        )
        if config.auth_scheme:
            found.authentication.scheme = config.auth_scheme
        return found

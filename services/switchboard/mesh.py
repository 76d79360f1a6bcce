"""Which services a Switchboard process runs, and ``create_server`` for them.

All-in-one and mesh shapes run this same code: ``SWITCHBOARD_SERVICES`` picks the
subset a process serves; services reach each other through their stubs.
Every process, whatever it serves, authenticates and authorizes its callers,
so each opens what that needs (``open_shared``); then each service it serves
builds itself from those (``<service>/build.py``), and nothing else is built.

This is the composition root: the one module that may import every service.
No service imports another, so what one uses of another's in the same process
it declares as a port, and ``connect`` plugs the other's part into it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

from google.protobuf.descriptor import ServiceDescriptor
from sqlalchemy.exc import DBAPIError

from switchboard.a2a import build as a2a
from switchboard.a2a import servicer as a2a_servicer
from switchboard.a2a.card import servicer as card_servicer
from switchboard.a2a.push.delivery import PushDelivery
from switchboard.auth import build as auth
from switchboard.auth import servicer as auth_servicer
from switchboard.context import build as context
from switchboard.context import servicer as context_servicer
from switchboard.context.semantic.retrieval.filters import parse_filter
from switchboard.context.text.tokencount import ApproxTokenCounter
from switchboard.dispatcher import build as dispatcher
from switchboard.dispatcher import servicer as dispatcher_servicer
from switchboard.dispatcher.budgets.embeddings import LedgerCharger, parse_embedding_prices
from switchboard.dispatcher.budgets.ledger import Ledger
from switchboard.events import build as events
from switchboard.events import servicer as events_servicer
from switchboard.integration import build as integration
from switchboard.integration import servicer as integration_servicer
from switchboard.integration.directory import ExpertEntry, workspace_experts
from switchboard.platform.cache import Cache
from switchboard.platform.config import ConfigError, KernelSettings
from switchboard.platform.events.bus import EventBus
from switchboard.platform.events.eventlog import LocalLog, LogBackend, RedisLog
from switchboard.platform.events.loglock import EventLogLock, lock_sqlite_file
from switchboard.platform.observe.metrics import Metrics
from switchboard.platform.observe.telemetry import Tracing, default_service_name, install
from switchboard.platform.process import Shared
from switchboard.platform.rpc.server import ServiceRegistration, SwitchboardServer, build_server
from switchboard.platform.security.accesswatch import AccessWatch
from switchboard.platform.security.authenticator import CredentialAuthenticator
from switchboard.platform.security.authn import Guard
from switchboard.platform.security.credentials.accesstokens import (
    AccessTokens,
    KeyRing,
    SigningKey,
    TokenPolicy,
    load_key_ring,
)
from switchboard.platform.security.credentials.devkey import (
    DevKeyError,
    dev_key_path,
    dev_signing_key,
)
from switchboard.platform.security.credentials.devkey import key_id as dev_key_id
from switchboard.platform.security.credentials.opaque import OpaqueSecrets
from switchboard.platform.security.credentials.records import CredentialRecords
from switchboard.platform.security.credentials.secretbox import SecretBox
from switchboard.platform.security.membership import CachedMemberships, MembershipStore
from switchboard.platform.security.policy import Policy
from switchboard.platform.store.db import (
    Database,
    is_outage,
    open_database,
)
from switchboard.platform.store.outbox import Outbox
from switchboard.platform.store.pagination import PageTokens
from switchboard.settings import Settings

log = logging.getLogger("switchboard.mesh")

#: Health entry that is NOT_SERVING while Redis is unreachable (scaled out only).
REDIS_HEALTH = "switchboard.redis"
#: Health entry that is NOT_SERVING while the database does not answer (every process).
DATABASE_HEALTH = "switchboard.database"

#: A service's build: its registration, or several when it serves companions beside its
#: main service (a2a: the public Agent Card, ``COMPANIONS``).
Build = Callable[[Shared], Awaitable[ServiceRegistration | tuple[ServiceRegistration, ...]]]

# Short name (for SWITCHBOARD_SERVICES / --services) -> descriptor, methods
# answered with pre-serialized bytes, and how the service builds itself from
# the process's shared resources. Registration follows the descriptor
# (platform/rpc/registration.py).
SERVICES: dict[str, tuple[ServiceDescriptor, frozenset[str], Build]] = {
    "auth": (auth_servicer.SERVICE, frozenset(), auth.build),
    "context": (context_servicer.SERVICE, context_servicer.PRESERIALIZED, context.build),
    "dispatcher": (dispatcher_servicer.SERVICE, frozenset(), dispatcher.build),
    "integration": (integration_servicer.SERVICE, frozenset(), integration.build),
    "events": (events_servicer.SERVICE, events_servicer.PRESERIALIZED, events.build),
    "a2a": (a2a_servicer.SERVICE, frozenset(), a2a.build),
}
#: Services a short name serves beside its main one, in the same process (its build
#: registers them): Envoy routes them with it, the access table guards them.
COMPANIONS: dict[str, tuple[ServiceDescriptor, ...]] = {"a2a": (card_servicer.SERVICE,)}
#: Services that stream no run's tokens (WatchRun, Subscribe and A2A's streams do): a
#: process serving only these does not listen to the other processes' tokens.
TOKEN_DEAF: Final = frozenset({"auth", "context", "integration"})


async def registrations(settings: KernelSettings, shared: Shared) -> list[ServiceRegistration]:
    """What each configured service's build registers, in order."""
    built: list[ServiceRegistration] = []
    for name in settings.services:
        made = await SERVICES[name][2](shared)
        built += made if isinstance(made, tuple) else [made]
    return built


def event_log(
    settings: KernelSettings, database: Database, outbox: Outbox | None = None
) -> LogBackend:
    """Redis Streams when Redis is configured, else the embedded database log."""
    memory = min(settings.events_memory, settings.events_retention)
    redis_url = settings.redis_url.get_secret_value()
    if redis_url:
        return RedisLog(
            redis_url,
            key=settings.events_stream_key,
            timeout_s=settings.redis_timeout_s,
            retention=settings.events_retention,
            retention_s=settings.events_retention_s,
            memory=memory,
            outbox_limit=settings.events_outbox_limit,
            dedupe_window_s=settings.events_dedupe_window_s,
            outbox=outbox,
        )
    return LocalLog(
        database,
        retention=settings.events_retention,
        retention_s=settings.events_retention_s,
        memory=memory,
        outbox=outbox,
    )


@contextlib.contextmanager
def database_setting() -> Iterator[None]:
    """A database that cannot be opened at start is a ConfigError naming SWITCHBOARD_DATABASE_URL.

    Wrong host, password or path, or a server that is down: the operator gets
    one line with the driver's reason instead of a traceback. The reason never
    holds the password (drivers do not echo it; our own messages mask it).
    """
    try:
        yield
    except Exception as exc:
        if not (is_outage(exc) or isinstance(exc, DBAPIError)):
            raise
        # The driver's own error says what is wrong; SQLAlchemy's wrapper adds a URL.
        root: BaseException = exc
        for _ in range(8):  # a cause chain is short; bounded in case it loops
            orig = getattr(root, "orig", None)
            cause = orig if isinstance(orig, BaseException) else root.__cause__
            if cause is None:
                break
            root = cause
        reason = (str(root).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"SWITCHBOARD_DATABASE_URL: cannot open the database: {type(root).__name__}: {reason}"
        ) from None


def check_settings(settings: Settings) -> None:
    """Parse the settings only the services understand, before anything opens.

    The sections' validation knows types and ranges; the text formats of routes,
    remote experts, LLM providers and prices and the blocklist belong to the
    dispatcher, the trusted proxies to auth. Every
    process checks them all, whatever it serves. One ConfigError names every
    bad variable, so a typo stops the start before the database is touched.
    """
    problems = []
    for variable, parse in (
        *dispatcher.checks(settings.dispatcher, settings.remote_handlers, settings.llm),
        *auth.checks(settings.auth),
    ):
        try:
            parse()
        except ConfigError as exc:
            problems.append(str(exc))
        except (ValueError, TypeError) as exc:
            problems.append(f"{variable}: {exc}")
    if problems:
        raise ConfigError("; ".join(problems))


def instance_id(settings: KernelSettings) -> str:
    """This dispatcher replica's id: the configured one, else the host name."""
    return settings.instance_id or socket.gethostname()[:64]


def configured_key_ring(settings: KernelSettings) -> KeyRing | None:
    """The keys of SWITCHBOARD_SIGNING_KEYS; None in dev mode without any."""
    if settings.signing_keys:
        try:
            return load_key_ring(settings.signing_keys)
        except ValueError as exc:
            raise ConfigError(f"SWITCHBOARD_SIGNING_KEYS: {exc}") from None
    if not settings.dev_mode:  # the settings validator already refuses this
        raise ConfigError("SWITCHBOARD_SIGNING_KEYS is required outside dev mode")
    return None


def dev_key_ring(settings: KernelSettings) -> KeyRing:
    """Dev mode's key: kept beside the database (``devkey``: a restart keeps everyone
    signed in), or one of this process's own when the database is not a file. Read once
    the database is open and locked: its directory exists, and no other process serves it.
    """
    path = dev_key_path(settings.database_url.get_secret_value())
    if path is None:
        log.warning(
            "DEV MODE: generated a signing key for this process only (the database is not "
            "a file, so there is nowhere to keep it); its tokens die with this process and "
            "other processes will not accept them. Set SWITCHBOARD_SIGNING_KEYS."
        )
        generated = SigningKey.generate()
        return KeyRing(SigningKey(dev_key_id(generated), generated.private_key))
    try:
        dev = dev_signing_key(path)
    except DevKeyError as exc:
        raise ConfigError(f"SWITCHBOARD_DEV_MODE: {exc}") from None
    except OSError as exc:
        raise ConfigError(
            f"SWITCHBOARD_DEV_MODE: cannot keep the dev signing key {path}: {exc.strerror}"
        ) from None
    log.warning(
        "DEV MODE: %s %s (owner-only) so that a restart keeps tokens valid; it is for "
        "development only and never used outside dev mode, which needs "
        "SWITCHBOARD_SIGNING_KEYS (switchboard keygen). Deleting it signs everyone out.",
        "made a signing key and kept it in" if dev.created else "signing with the key kept in",
        path,
    )
    return KeyRing(dev.key)


async def open_shared(
    config: Settings, resources: contextlib.AsyncExitStack, metrics: Metrics | None = None
) -> Shared:
    """Open what every process needs to authenticate and authorize; each closes with
    ``resources``. The kernel's settings say how; the services' sections ride along."""
    settings = config.kernel
    # Configured keys are checked before anything opens; dev mode's once the database is.
    configured = configured_key_ring(settings)
    instance = instance_id(settings)
    database = await open_locked_database(settings, instance, resources)
    keys = configured or dev_key_ring(settings)
    tokens = AccessTokens(
        keys,
        TokenPolicy(
            issuer=settings.auth_issuer,
            audience=settings.auth_audience,
            access_ttl_s=settings.access_token_ttl_s,
        ),
    )
    secrets = OpaqueSecrets(settings.effective_secret_key())
    memberships = MembershipStore(database)
    cache, authenticator, cached = await open_cache(
        settings, database, tokens, secrets, memberships, resources
    )
    bus = await open_bus(settings, database, authenticator, cached, resources, metrics)
    return Shared(
        settings=settings,
        sections=config,
        resources=resources,
        database=database,
        cache=cache,
        bus=bus,
        keys=keys,
        tokens=tokens,
        secrets=secrets,
        authenticator=authenticator,
        memberships=memberships,
        # Unary calls' checks from the cache; open streams re-check against the database.
        policy=Policy(cached),
        access=watch_access(settings, cache, bus, authenticator, memberships, cached, resources),
        secret_box=SecretBox(settings.effective_secret_key()),
        page_tokens=PageTokens(settings.effective_secret_key()),
        instance_id=instance,
        metrics=metrics,
    )


async def open_locked_database(
    settings: KernelSettings, instance: str, resources: contextlib.AsyncExitStack
) -> Database:
    """The database, once no other process may write it that must not (a SQLite file
    has one process; the embedded event log and a dispatcher's instance id, one each)."""
    # Before anything touches the file: a second process on it is refused.
    resources.enter_context(lock_sqlite_file(settings.database_url.get_secret_value()))
    # PostgreSQL: processes with the embedded event log are refused beside any other.
    log_lock = EventLogLock(
        settings.database_url.get_secret_value(),
        embedded=not settings.redis_url.get_secret_value(),
        timeout_s=settings.database_timeout_s,
        # Taken by another process while ours was lost: stop as on SIGTERM.
        on_lost=lambda: signal.raise_signal(signal.SIGTERM),
        # A dispatcher replica owns its runs by instance id: one live process per id.
        instance=instance if "dispatcher" in settings.services else "",
    )
    resources.push_async_callback(log_lock.close)
    with database_setting():
        await log_lock.acquire()
        database = await open_database(
            settings.database_url.get_secret_value(),
            timeout_s=settings.database_timeout_s,
            migrate=settings.database_auto_migrate,
        )
    resources.push_async_callback(database.close)
    return database


async def open_cache(
    settings: KernelSettings,
    database: Database,
    tokens: AccessTokens,
    secrets: OpaqueSecrets,
    memberships: MembershipStore,
    resources: contextlib.AsyncExitStack,
) -> tuple[Cache, CredentialAuthenticator, CachedMemberships]:
    """The cache (Redis, or this process's memory), and the credential authenticator and
    the membership cache that hear invalidations through it."""
    cache = Cache(
        settings.redis_url.get_secret_value(),
        timeout_s=settings.redis_timeout_s,
        lease_s=settings.redis_lease_s,
    )
    # Subscribes to revocations, so it must exist before the cache starts.
    authenticator = CredentialAuthenticator(
        tokens,
        CredentialRecords(database),
        secrets,
        cache,
        token_cache_size=settings.token_cache_size,
    )
    cached = CachedMemberships(memberships, cache, size=settings.membership_cache_size)
    await cache.start()
    resources.push_async_callback(cache.close)
    return cache, authenticator, cached


async def open_bus(
    settings: KernelSettings,
    database: Database,
    authenticator: CredentialAuthenticator,
    memberships: CachedMemberships,
    resources: contextlib.AsyncExitStack,
    metrics: Metrics | None,
) -> EventBus:
    """The event bus over the configured log (``event_log``)."""
    # Events written with their change, published whatever crashes (docs/decisions.md).
    outbox = Outbox(database)
    bus = EventBus(
        event_log(settings, database, outbox),
        memory=min(settings.events_memory, settings.events_retention),
        outbox=outbox,
        metrics=metrics,
        # Tokens are only for streams of runs; elsewhere hearing them costs a decode each.
        hear_tokens=not TOKEN_DEAF.issuperset(settings.services),
    )
    # A revocation's event backs up its message (lost if the revoker died in between).
    bus.listen(authenticator.on_event)
    # A membership's change drops what the cache holds of it: here before the call that
    # made it returns, and in every process by its message, or else by its event.
    bus.listen(memberships.on_event)
    bus.on_publishing(memberships.publishing)
    await bus.start()
    resources.push_async_callback(bus.close)
    return bus


def watch_access(
    settings: KernelSettings,
    cache: Cache,
    bus: EventBus,
    authenticator: CredentialAuthenticator,
    memberships: MembershipStore,
    cached: CachedMemberships,
    resources: contextlib.AsyncExitStack,
) -> AccessWatch:
    """What keeps every open stream's access current: revocations, memberships (a
    stream's new actions checked as unary calls are, from the cache; its re-checks
    after a change, from the database)."""
    access = AccessWatch(
        bus.fanout,
        authenticator,
        memberships,
        action_memberships=cached,
        reauthorize_s=settings.events_reauthorize_s,
        # Redis away: revocation messages and other processes' events may be missed.
        degraded=lambda: not cache.fresh() or bus.state != "ok",
    )
    authenticator.on_revocation(access.revoked)
    resources.push_async_callback(access.close)
    return access


def connect(shared: Shared) -> None:
    """Plug into each service's ports what it uses of another's in this process."""
    # The integration service's webhook engine sends the front door's push notifications.
    shared.plug(integration.PUSH_NOTIFICATIONS, PushDelivery(shared.database, shared.secret_box))

    # A workspace's embedding calls are held and charged in its budgets like model calls
    # (docs/semantic.md, "Embeddings"); the budgets' database is the process's.
    def charger(prices: str) -> LedgerCharger:
        return LedgerCharger(Ledger(shared.database), parse_embedding_prices(prices))

    shared.plug(context.EMBEDDING_CHARGER, charger)

    async def experts(workspace_id: str, *, limit: int) -> list[ExpertEntry]:
        return await workspace_experts(
            shared.database, shared.secret_box, workspace_id, limit=limit
        )

    shared.plug(
        dispatcher.NEIGHBOURS,
        dispatcher.Neighbours(
            context=lambda: context.context_domain(shared),
            integrations=lambda: integration.integration_hub(shared),
            experts=experts,
            filters=parse_filter,
            count_tokens=ApproxTokenCounter().count,
        ),
    )


async def create_server(
    config: Settings, *, tracing: Tracing | None = None
) -> tuple[SwitchboardServer, int]:
    """Open resources and build every configured service into one bound (not started) server.

    Tracing comes from the ``OTEL_*`` variables (``platform/observe/telemetry.py``)
    unless ``tracing`` is given (tests hand in one with an in-memory exporter).
    """
    check_settings(config)
    settings = config.kernel
    if tracing is None:
        tracing = Tracing.from_environ(service_name=default_service_name(settings.services))
    resources = contextlib.AsyncExitStack()
    if tracing is not None:
        # Closed last (the stack unwinds in reverse): what closing the rest
        # traces is still exported.
        resources.callback(tracing.shutdown)
    # Before anything opens: channels, HTTP clients and stores ask for it as they are built.
    resources.callback(install(tracing))
    try:
        # Recorded only where they are served: without the port nothing pays for them.
        metrics = Metrics(process=True) if settings.metrics_port is not None else None
        shared = await open_shared(config, resources, metrics)
        connect(shared)
        registered = await registrations(settings, shared)
        server = await build_server(
            settings,
            registered,
            guard=Guard(shared.authenticator, shared.policy),
            resources=resources,
            shared=shared,
            tracing=tracing,
            metrics=metrics,
        )
        for registration in registered:
            if registration.on_bound is not None:
                # Known only now that the port is bound; done before any call is taken.
                await registration.on_bound(server.port)
    except BaseException:
        await resources.aclose()
        raise
    # Requests answer UNAVAILABLE meanwhile; "" stays SERVING (docs/operations.md).
    server.report(DATABASE_HEALTH, shared.database.health.serving)
    shared.database.health.on_state_change(lambda serving: server.report(DATABASE_HEALTH, serving))
    if settings.redis_url.get_secret_value():
        # Redis away means degraded, not down: "" stays SERVING, this entry does not.
        server.report(REDIS_HEALTH, shared.bus.state == "ok")
        shared.bus.on_state_change(lambda state: server.report(REDIS_HEALTH, state == "ok"))
    if metrics is not None:
        observe(metrics, shared, server)
        for registration in registered:
            if registration.observe is not None:
                registration.observe(metrics)
    return server, server.port


def observe(metrics: Metrics, shared: Shared, server: SwitchboardServer) -> None:
    """Read the process's current state at every scrape (docs/metrics.md); each
    service adds its own (``ServiceRegistration.observe``)."""
    bus = shared.bus
    metrics.observe("switchboard_subscribers", lambda: [(("events",), bus.fanout.count)])
    metrics.observe(
        "switchboard_event_subscriber_backlog_events", lambda: [((), sum(bus.fanout.backlogs()))]
    )
    metrics.observe(
        "switchboard_event_subscriber_backlog_max_events",
        lambda: [((), max(bus.fanout.backlogs(), default=0))],
    )
    metrics.observe(
        "switchboard_event_log_degraded", lambda: [((), 0.0 if bus.state == "ok" else 1.0)]
    )
    metrics.observe(
        "switchboard_event_outbox_events",
        lambda: [
            (("memory",), bus.held),
            (("database",), len(bus.outbox.pending) if bus.outbox is not None else 0),
        ],
    )
    database = shared.database
    metrics.observe(
        "switchboard_db_pool_connections",
        lambda: [
            (("checked_out",), database.pool_status()[0]),
            (("idle",), database.pool_status()[1]),
        ],
    )
    metrics.observe(
        "switchboard_db_pool_max_connections", lambda: [((), database.pool_status()[2])]
    )

    def dependency(entry: str) -> str:
        return entry.removeprefix("switchboard.")

    metrics.observe(
        "switchboard_dependency_up",
        lambda: [
            ((dependency(entry),), 1.0 if serving else 0.0)
            for entry, serving in server.components.items()
        ],
    )
    metrics.observe(
        "switchboard_dependency_outages_total",
        lambda: [
            ((dependency(entry),), server.outages.get(entry, 0)) for entry in server.components
        ],
    )

"""A person's data (issue 83, docs/privacy.md): the stores a test runs on (the embedded
default, or PostgreSQL, Redis and an S3 bucket), and a signed-in person whose email the
test knows."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from grpc import aio

from switchboard.auth.accounts import Accounts, ClientContext
from switchboard.auth.store import AuthStore
from switchboard.platform.rpc.server import SwitchboardServer
from switchboard.platform.security.policy import AuthMethod
from switchboard.settings import Settings
from tests.conftest import built, make_settings, started
from tests.infra.redis import RedisServer
from tests.infra.seaweedfs import SeaweedServer
from tests.kits.authkit import unique_email
from tests.kits.contextkit import Caller


@dataclass(frozen=True)
class Person:
    caller: Caller
    email: str


async def person(server: SwitchboardServer) -> Person:
    """A signed-in user whose email the test knows (no password hashing)."""
    email = unique_email("person")
    user = await AuthStore(server.shared.database).create_user(email, "Erin Example", None)
    sign_in = await built(server, Accounts).start_session(
        user, AuthMethod.PASSWORD, ClientContext(address="127.0.0.1")
    )
    return Person(Caller(user.id, sign_in.tokens.access_token), email)


@pytest.fixture(params=["sqlite", "postgres+redis+s3"])
def stores_settings_fixture(request: pytest.FixtureRequest) -> Settings:
    """The embedded default, or the scaled-out stores: PostgreSQL, Redis and an S3 bucket
    on SeaweedFS (looked up only then, so a SQLite-only run starts none); bound as
    ``stores_settings``."""
    if request.param == "sqlite":
        return make_settings()
    url: str = request.getfixturevalue("migrated_postgres_url")
    redis: RedisServer = request.getfixturevalue("redis_server")
    seaweedfs: SeaweedServer = request.getfixturevalue("seaweedfs")
    bucket: str = request.getfixturevalue("s3_bucket")
    return make_settings(
        database_url=url,
        redis_url=redis.url,
        context_blob_store="s3",
        context_s3_endpoint=seaweedfs.endpoint,
        context_s3_bucket=bucket,
        context_s3_access_key_id=seaweedfs.access_key,
        context_s3_secret_access_key=seaweedfs.secret_key,
    )


@pytest_asyncio.fixture
async def stores_fixture(
    stores_settings: Settings,
) -> AsyncIterator[tuple[SwitchboardServer, aio.Channel]]:
    """A server on those stores, and a channel to it (bound as ``stores``)."""
    async with (
        started(stores_settings) as server,
        aio.insecure_channel(server.address) as channel,
    ):
        yield server, channel

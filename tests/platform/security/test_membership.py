"""Membership lookups: a database that does not answer is an outage (UNAVAILABLE), never a bug."""

from __future__ import annotations

import pytest

from switchboard.platform.errors import DependencyUnavailable
from switchboard.platform.security.membership import MembershipStore
from switchboard.platform.store.db import Database
from tests.infra.postgres import _free_port

pytestmark = pytest.mark.unit


async def test_an_unreachable_database_is_dependency_unavailable() -> None:
    # Nothing listens on a port just found free: connections are refused.
    database = Database(
        f"postgresql+asyncpg://nobody:x@127.0.0.1:{_free_port()}/none", timeout_s=0.5
    )
    try:
        with pytest.raises(DependencyUnavailable):
            await MembershipStore(database).role_of("w", "u")
    finally:
        await database.close()

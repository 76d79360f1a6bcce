"""The access watch maps a database outage met while re-checking a stream to UNAVAILABLE.

Whatever lets a driver error through (a credential verifier or membership
reader that does not map it itself), a re-check prompted by a change fails
closed with UNAVAILABLE, the status a unary call gets during an outage, never
INTERNAL; a degraded-mode round does the same.
"""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError

from switchboard.platform.errors import Code, DatabaseUnavailable, TokenExpired
from switchboard.platform.events.bus import Fanout
from switchboard.platform.security.accesswatch import CHANGE, AccessWatch
from switchboard.platform.security.policy import AuthMethod, Permission, Principal, Role, Scope

pytestmark = pytest.mark.unit

PRINCIPAL = Principal(
    user_id="u1", auth_method=AuthMethod.PASSWORD, scopes=frozenset(Scope), session_id="s1"
)


def _refused() -> OperationalError:
    # What SQLAlchemy raises when the server does not answer (the driver's error inside).
    return OperationalError("SELECT 1", None, ConnectionRefusedError(111, "Connection refused"))


class Deployment:
    """A credential verifier and membership reader whose database can go away."""

    def __init__(self) -> None:
        self.credentials_down = False
        self.memberships_down = False

    async def verify_principal(self, principal: Principal) -> float | None:
        if self.credentials_down:
            raise _refused()
        return None

    async def role_of(
        self, workspace_id: str, user_id: str, *, include_deleted: bool = False
    ) -> Role | None:
        if self.memberships_down:
            raise _refused()
        return Role.OWNER


def _watch(deployment: Deployment, *, degraded: bool = False) -> AccessWatch:
    return AccessWatch(
        Fanout(),
        deployment,
        deployment,
        reauthorize_s=3600,
        degraded=lambda: degraded,
    )


async def test_a_credential_outage_after_a_change_ends_the_stream_unavailable() -> None:
    deployment = Deployment()
    watch = _watch(deployment)
    grant = watch.open(PRINCIPAL)
    try:
        await grant.verify()
        deployment.credentials_down = True
        grant.wake(CHANGE)
        with pytest.raises(DatabaseUnavailable):
            await grant.confirm()
        assert isinstance(grant.error, DatabaseUnavailable), grant.error
        assert grant.error.code == Code.UNAVAILABLE
    finally:
        await watch.close()


async def test_a_membership_outage_after_a_change_ends_the_hold_unavailable() -> None:
    deployment = Deployment()
    watch = _watch(deployment)
    grant = watch.open(PRINCIPAL)
    try:
        hold = await grant.hold([("workspaces/acme", "name")], Permission.READ)
        deployment.memberships_down = True
        grant.wake(CHANGE)
        with pytest.raises(DatabaseUnavailable):
            await hold.confirm()
        assert isinstance(hold.error, DatabaseUnavailable), hold.error
    finally:
        await watch.close()


async def test_a_new_action_during_an_outage_is_unavailable() -> None:
    deployment = Deployment()
    watch = _watch(deployment)
    grant = watch.open(PRINCIPAL)
    try:
        deployment.memberships_down = True
        with pytest.raises(DatabaseUnavailable):
            await grant.authorize("workspaces/acme", Permission.READ, "name")
        # The action failed, not the stream.
        assert grant.error is None
    finally:
        await watch.close()


async def test_a_degraded_round_during_an_outage_fails_closed_unavailable() -> None:
    deployment = Deployment()
    watch = _watch(deployment, degraded=True)
    grant = watch.open(PRINCIPAL)
    try:
        await grant.verify()
        deployment.credentials_down = True
        await grant.sweep(watch.lookups())
        assert isinstance(grant.error, DatabaseUnavailable), grant.error
    finally:
        await watch.close()


class Expiring:
    """A credential that holds until ``until`` on a clock the test moves."""

    def __init__(self, until: float) -> None:
        self.now = 0.0
        self.until = until

    def clock(self) -> float:
        return self.now

    async def verify_principal(self, principal: Principal) -> float | None:
        if self.now >= self.until:
            raise TokenExpired("access token expired")
        return self.until

    async def role_of(
        self, workspace_id: str, user_id: str, *, include_deleted: bool = False
    ) -> Role | None:
        return Role.OWNER


async def test_nothing_is_confirmed_once_the_credential_ran_out_even_before_its_timer() -> None:
    """A unary call at the instant of expiry is refused; so is a stream's next item, even if
    the expiry timer (another clock, a little late) has not fired yet."""
    credential = Expiring(until=100.0)
    watch = AccessWatch(
        Fanout(),
        credential,
        credential,
        reauthorize_s=3600,
        degraded=lambda: False,
        clock=credential.clock,
    )
    grant = watch.open(PRINCIPAL)
    try:
        hold = await grant.hold([("workspaces/acme", "name")], Permission.READ)
        await hold.confirm()  # valid now: the timer is 100 s away on the loop's clock
        credential.now = 100.0
        with pytest.raises(TokenExpired):
            await hold.confirm()
    finally:
        await watch.close()

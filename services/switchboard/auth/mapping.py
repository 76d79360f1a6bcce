"""Records to messages: the one place a user, session or API key becomes what a client sees.

The store's records (``auth/store.py``) carry ids; the names clients see
(``users/{user}/sessions/{session}``, ``platform/values/resources.py``) are written
here. A key's digest never reaches a message.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp

from switchboard.api.auth.v1 import auth_pb2
from switchboard.auth.store import ApiKeyRecord, IdentityRecord, SessionRecord, UserRecord
from switchboard.platform.events.erasure.store import ErasureRecord
from switchboard.platform.security.credentials.accesstokens import KeyRing
from switchboard.platform.security.credentials.opaque import API_KEY_PREFIX
from switchboard.platform.security.policy import AuthMethod, Principal
from switchboard.platform.values.names import etag_of
from switchboard.platform.values.resources import ApiKeyName, SessionName, UserName

_AUTH_METHODS: Final = {
    AuthMethod.PASSWORD.value: auth_pb2.AUTH_METHOD_PASSWORD,
    AuthMethod.OIDC.value: auth_pb2.AUTH_METHOD_OIDC,
    AuthMethod.API_KEY.value: auth_pb2.AUTH_METHOD_API_KEY,
}


def timestamp(when: dt.datetime | None) -> Timestamp | None:
    if when is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def user(record: UserRecord, identities: Sequence[IdentityRecord]) -> auth_pb2.User:
    return auth_pb2.User(
        name=str(UserName(record.id)),
        email=record.email,
        display_name=record.display_name,
        create_time=timestamp(record.created_at),
        update_time=timestamp(record.updated_at),
        federated_identities=[
            auth_pb2.FederatedIdentity(issuer=i.issuer, subject=i.subject) for i in identities
        ],
        etag=etag_of(record.version),
    )


def session(record: SessionRecord, current_session: str) -> auth_pb2.Session:
    """``record`` as its owner sees it; ``current`` when it is ``current_session``."""
    return auth_pb2.Session(
        name=str(SessionName(record.user_id, record.id)),
        create_time=timestamp(record.created_at),
        last_seen_time=timestamp(record.last_seen_at),
        expire_time=timestamp(record.expires_at),
        revoke_time=timestamp(record.revoked_at),
        client_info=auth_pb2.ClientInfo(
            user_agent=record.user_agent, device_name=record.device_name
        ),
        client_address=record.client_address,
        current=record.id == current_session,
        auth_method=_AUTH_METHODS.get(record.auth_method, auth_pb2.AUTH_METHOD_UNSPECIFIED),
    )


def api_key(record: ApiKeyRecord) -> auth_pb2.ApiKey:
    return auth_pb2.ApiKey(
        name=str(ApiKeyName(record.user_id, record.id)),
        display_name=record.display_name,
        prefix=f"{API_KEY_PREFIX}{record.id}",
        scopes=record.scopes,
        create_time=timestamp(record.created_at),
        expire_time=timestamp(record.expires_at),
        last_used_time=timestamp(record.last_used_at),
        revoke_time=timestamp(record.revoked_at),
        assistant_pins=[
            auth_pb2.ApiKeyAssistantPin(assistant=name, revision=revision)
            for name, revision in record.assistant_pins
        ],
    )


def token_pair(
    access_token: str,
    access_expires_at: dt.datetime,
    refresh_token: str,
    refresh_expires_at: dt.datetime,
) -> auth_pb2.TokenPair:
    return auth_pb2.TokenPair(
        access_token=access_token,
        access_token_expire_time=timestamp(access_expires_at),
        refresh_token=refresh_token,
        refresh_token_expire_time=timestamp(refresh_expires_at),
        token_type="Bearer",  # noqa: S106 - the OAuth token type, not a secret
    )


def principal(found: Principal) -> auth_pb2.Principal:
    expires = dt.datetime.fromtimestamp(found.expires_at, dt.UTC) if found.expires_at else None
    return auth_pb2.Principal(
        user=found.user_name,
        session=found.session_name,
        api_key=found.api_key_name,
        scopes=sorted(s.value for s in found.scopes),
        auth_method=_AUTH_METHODS[found.auth_method.value],
        expire_time=timestamp(expires),
    )


def jwks(keys: KeyRing) -> auth_pb2.GetJwksResponse:
    found = keys.jwks()
    return auth_pb2.GetJwksResponse(
        keys=[auth_pb2.JsonWebKey(**key) for key in found],
        jwks_json=json.dumps({"keys": found}, separators=(",", ":")),
    )


def erasure(record: ErasureRecord) -> auth_pb2.Erasure:
    """An erasure as DeleteMyAccount and ``switchboard erasures`` show it."""
    return auth_pb2.Erasure(
        name=f"erasures/{record.id}",
        user=str(UserName(record.user_id)),
        state=(
            auth_pb2.ERASURE_STATE_DONE
            if record.done_at is not None
            else auth_pb2.ERASURE_STATE_RUNNING
        ),
        pending_parts=list(record.pending),
        create_time=timestamp(record.created_at),
        done_time=timestamp(record.done_at),
    )

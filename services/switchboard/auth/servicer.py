"""Transport for AuthService: converts proto to domain calls and nothing else."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.auth.accounts import Accounts, ClientContext, IssuedTokens, SignIn
from switchboard.auth.tokens import KeyRing
from switchboard.platform import names, timefields
from switchboard.platform.authn import current_principal
from switchboard.platform.clientaddr import TrustedProxies, client_address, forwarded_values
from switchboard.platform.errors import FieldViolation, InvalidArgument
from switchboard.platform.models import ApiKeyRow, FederatedIdentityRow, SessionRow, UserRow
from switchboard.platform.policy import AuthMethod
from switchboard.platform.unimplemented import unimplemented_rpcs

SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]

_AUTH_METHODS = {
    AuthMethod.PASSWORD.value: auth_pb2.AUTH_METHOD_PASSWORD,
    AuthMethod.OIDC.value: auth_pb2.AUTH_METHOD_OIDC,
    AuthMethod.API_KEY.value: auth_pb2.AUTH_METHOD_API_KEY,
}
_SESSION_NAME = names.SESSION
_API_KEY_NAME = names.API_KEY


def _ts(when: dt.datetime | None) -> Timestamp | None:
    if when is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def _client(context: Any, info: auth_pb2.ClientInfo, trusted: TrustedProxies) -> ClientContext:
    # Behind Envoy the peer is Envoy: the client is in x-forwarded-for, if the
    # peer is a proxy we trust (platform/clientaddr.py).
    address = client_address(
        context.peer() or "", forwarded_values(context.invocation_metadata()), trusted
    )
    return ClientContext(address=address, user_agent=info.user_agent, device_name=info.device_name)


def _user(user: UserRow, identities: list[FederatedIdentityRow]) -> auth_pb2.User:
    return auth_pb2.User(
        name=f"users/{user.id}",
        email=user.email,
        display_name=user.display_name,
        create_time=_ts(user.created_at),
        update_time=_ts(user.updated_at),
        federated_identities=[
            auth_pb2.FederatedIdentity(issuer=i.issuer, subject=i.subject) for i in identities
        ],
        etag=f'"{user.version}"',
    )


def _session(row: SessionRow, current_session: str) -> auth_pb2.Session:
    return auth_pb2.Session(
        name=f"users/{row.user_id}/sessions/{row.id}",
        create_time=_ts(row.created_at),
        last_seen_time=_ts(row.last_seen_at),
        expire_time=_ts(row.expires_at),
        revoke_time=_ts(row.revoked_at),
        client_info=auth_pb2.ClientInfo(user_agent=row.user_agent, device_name=row.device_name),
        client_address=row.client_address,
        current=row.id == current_session,
        auth_method=_AUTH_METHODS.get(row.auth_method, auth_pb2.AUTH_METHOD_UNSPECIFIED),
    )


def _api_key(row: ApiKeyRow) -> auth_pb2.ApiKey:
    return auth_pb2.ApiKey(
        name=f"users/{row.user_id}/apiKeys/{row.id}",
        display_name=row.display_name,
        prefix=f"sbk_{row.id}",
        scopes=row.scopes.split(),
        create_time=_ts(row.created_at),
        expire_time=_ts(row.expires_at),
        last_used_time=_ts(row.last_used_at),
        revoke_time=_ts(row.revoked_at),
    )


def _tokens(tokens: IssuedTokens) -> auth_pb2.TokenPair:
    return auth_pb2.TokenPair(
        access_token=tokens.access_token,
        access_token_expire_time=_ts(tokens.access_expires_at),
        refresh_token=tokens.refresh_token,
        refresh_token_expire_time=_ts(tokens.refresh_expires_at),
        token_type="Bearer",  # noqa: S106 - the OAuth token type, not a secret
    )


def _sign_in(result: SignIn) -> tuple[auth_pb2.User, auth_pb2.TokenPair, auth_pb2.Session]:
    return (
        _user(result.user, result.identities),
        _tokens(result.tokens),
        _session(result.session, result.session.id),
    )


def _name_part(pattern: re.Pattern[str], name: str, field: str) -> str:
    # The interceptor already checked the name belongs to the caller; this
    # only extracts the child id (and rejects other shapes).
    match = pattern.fullmatch(name)
    if match is None:
        raise InvalidArgument(f"{field} is malformed", [FieldViolation(field, "malformed name")])
    return match.group(2)


@unimplemented_rpcs(SERVICE, planned="it arrives with the auth service (issue #3)")
class AuthServiceServicer(auth_pb2_grpc.AuthServiceServicer):
    """AuthService transport."""

    def __init__(self, accounts: Accounts, keys: KeyRing, trusted_proxies: TrustedProxies) -> None:
        self._accounts = accounts
        self._trusted_proxies = trusted_proxies
        jwks = keys.jwks()
        self._jwks = auth_pb2.GetJwksResponse(
            keys=[auth_pb2.JsonWebKey(**key) for key in jwks],
            jwks_json=json.dumps({"keys": jwks}, separators=(",", ":")),
        )

    async def Register(
        self, request: auth_pb2.RegisterRequest, context: Any
    ) -> auth_pb2.RegisterResponse:
        result = await self._accounts.register(
            request.email,
            request.password,
            request.display_name,
            _client(context, request.client_info, self._trusted_proxies),
        )
        user, tokens, session = _sign_in(result)
        return auth_pb2.RegisterResponse(user=user, tokens=tokens, session=session)

    async def Login(self, request: auth_pb2.LoginRequest, context: Any) -> auth_pb2.LoginResponse:
        client = _client(context, request.client_info, self._trusted_proxies)
        which = request.WhichOneof("credential")
        if which == "password":
            result = await self._accounts.login_password(
                request.password.email, request.password.password, client
            )
        elif which == "oidc":
            result = await self._accounts.login_oidc(request.oidc.id_token, client)
        else:
            raise InvalidArgument(
                "a credential is required",
                [FieldViolation("credential", "set password or oidc")],
            )
        user, tokens, session = _sign_in(result)
        return auth_pb2.LoginResponse(user=user, tokens=tokens, session=session)

    async def RefreshToken(
        self, request: auth_pb2.RefreshTokenRequest, context: Any
    ) -> auth_pb2.RefreshTokenResponse:
        tokens = await self._accounts.refresh(
            request.refresh_token, _client(context, auth_pb2.ClientInfo(), self._trusted_proxies)
        )
        return auth_pb2.RefreshTokenResponse(tokens=_tokens(tokens))

    async def Logout(
        self, request: auth_pb2.LogoutRequest, context: Any
    ) -> auth_pb2.LogoutResponse:
        await self._accounts.logout(current_principal())
        return auth_pb2.LogoutResponse()

    async def GetPrincipal(
        self, request: auth_pb2.GetPrincipalRequest, context: Any
    ) -> auth_pb2.GetPrincipalResponse:
        principal = current_principal()
        user, identities = await self._accounts.user(principal)
        expires = (
            dt.datetime.fromtimestamp(principal.expires_at, dt.UTC)
            if principal.expires_at
            else None
        )
        return auth_pb2.GetPrincipalResponse(
            principal=auth_pb2.Principal(
                user=principal.user_name,
                session=principal.session_name,
                api_key=principal.api_key_name,
                scopes=sorted(s.value for s in principal.scopes),
                auth_method=_AUTH_METHODS[principal.auth_method.value],
                expire_time=_ts(expires),
            ),
            user=_user(user, identities),
        )

    async def ListSessions(
        self, request: auth_pb2.ListSessionsRequest, context: Any
    ) -> auth_pb2.ListSessionsResponse:
        principal = current_principal()
        page = await self._accounts.list_sessions(
            principal,
            show_inactive=request.show_inactive,
            size=request.page_size,
            token=request.page_token,
        )
        return auth_pb2.ListSessionsResponse(
            sessions=[_session(row, principal.session_id) for row in page.items],
            next_page_token=page.next_page_token,
        )

    async def RevokeSession(
        self, request: auth_pb2.RevokeSessionRequest, context: Any
    ) -> auth_pb2.RevokeSessionResponse:
        principal = current_principal()
        session_id = _name_part(_SESSION_NAME, request.name, "name")
        row = await self._accounts.revoke_session(principal, session_id)
        return auth_pb2.RevokeSessionResponse(session=_session(row, principal.session_id))

    async def RevokeAllSessions(
        self, request: auth_pb2.RevokeAllSessionsRequest, context: Any
    ) -> auth_pb2.RevokeAllSessionsResponse:
        count = await self._accounts.revoke_all_sessions(current_principal(), request.keep_current)
        return auth_pb2.RevokeAllSessionsResponse(revoked_count=count)

    async def CreateApiKey(
        self, request: auth_pb2.CreateApiKeyRequest, context: Any
    ) -> auth_pb2.CreateApiKeyResponse:
        expires = (
            timefields.timestamp(request.expire_time, "expire_time")
            if request.HasField("expire_time")
            else None
        )
        row, secret = await self._accounts.create_api_key(
            current_principal(), request.display_name, request.scopes, expires
        )
        return auth_pb2.CreateApiKeyResponse(api_key=_api_key(row), secret=secret)

    async def ListApiKeys(
        self, request: auth_pb2.ListApiKeysRequest, context: Any
    ) -> auth_pb2.ListApiKeysResponse:
        page = await self._accounts.list_api_keys(
            current_principal(),
            show_inactive=request.show_inactive,
            size=request.page_size,
            token=request.page_token,
        )
        return auth_pb2.ListApiKeysResponse(
            api_keys=[_api_key(row) for row in page.items], next_page_token=page.next_page_token
        )

    async def RevokeApiKey(
        self, request: auth_pb2.RevokeApiKeyRequest, context: Any
    ) -> auth_pb2.RevokeApiKeyResponse:
        key_id = _name_part(_API_KEY_NAME, request.name, "name")
        row = await self._accounts.revoke_api_key(current_principal(), key_id)
        return auth_pb2.RevokeApiKeyResponse(api_key=_api_key(row))

    async def UpdateUser(
        self, request: auth_pb2.UpdateUserRequest, context: Any
    ) -> auth_pb2.UpdateUserResponse:
        paths = list(request.update_mask.paths)
        unsupported = [p for p in paths if p != "display_name"]
        if not paths or unsupported:
            raise InvalidArgument(
                "update_mask must list only display_name",
                [FieldViolation("update_mask", f"updatable: display_name; got {paths}")],
            )
        user, identities = await self._accounts.update_display_name(
            current_principal(), request.user.display_name, request.user.etag
        )
        return auth_pb2.UpdateUserResponse(user=_user(user, identities))

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: Any
    ) -> auth_pb2.GetJwksResponse:
        return self._jwks

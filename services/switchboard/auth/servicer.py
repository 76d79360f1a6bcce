"""Transport for AuthService: each RPC hands its request to one ``Accounts`` method.

What only the transport knows is added here and nothing else is done: the
caller's principal (``platform/security/authn.py``) and the client's address (the peer,
or ``x-forwarded-for`` from a proxy we trust, ``platform/rpc/clientaddr.py``).
"""

from __future__ import annotations

from typing import Any

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.auth.accounts import Accounts
from switchboard.platform.rpc.clientaddr import TrustedProxies, client_address, forwarded_values
from switchboard.platform.security.authn import current_principal

SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]


class AuthServiceServicer(auth_pb2_grpc.AuthServiceServicer):
    """AuthService transport."""

    def __init__(self, accounts: Accounts, trusted_proxies: TrustedProxies) -> None:
        self._accounts = accounts
        self._trusted_proxies = trusted_proxies

    def _address(self, context: Any) -> str:
        # Behind Envoy the peer is Envoy: the client is in x-forwarded-for, if the
        # peer is a proxy we trust.
        return client_address(
            context.peer() or "",
            forwarded_values(context.invocation_metadata()),
            self._trusted_proxies,
        )

    async def Register(
        self, request: auth_pb2.RegisterRequest, context: Any
    ) -> auth_pb2.RegisterResponse:
        return await self._accounts.register(request, self._address(context))

    async def Login(self, request: auth_pb2.LoginRequest, context: Any) -> auth_pb2.LoginResponse:
        return await self._accounts.login(request, self._address(context))

    async def RefreshToken(
        self, request: auth_pb2.RefreshTokenRequest, context: Any
    ) -> auth_pb2.RefreshTokenResponse:
        return await self._accounts.refresh(request, self._address(context))

    async def Logout(
        self, request: auth_pb2.LogoutRequest, context: Any
    ) -> auth_pb2.LogoutResponse:
        return await self._accounts.logout(current_principal())

    async def GetPrincipal(
        self, request: auth_pb2.GetPrincipalRequest, context: Any
    ) -> auth_pb2.GetPrincipalResponse:
        return await self._accounts.get_principal(current_principal())

    async def ListSessions(
        self, request: auth_pb2.ListSessionsRequest, context: Any
    ) -> auth_pb2.ListSessionsResponse:
        return await self._accounts.list_sessions(current_principal(), request)

    async def RevokeSession(
        self, request: auth_pb2.RevokeSessionRequest, context: Any
    ) -> auth_pb2.RevokeSessionResponse:
        return await self._accounts.revoke_session(current_principal(), request)

    async def RevokeAllSessions(
        self, request: auth_pb2.RevokeAllSessionsRequest, context: Any
    ) -> auth_pb2.RevokeAllSessionsResponse:
        return await self._accounts.revoke_all_sessions(current_principal(), request)

    async def CreateApiKey(
        self, request: auth_pb2.CreateApiKeyRequest, context: Any
    ) -> auth_pb2.CreateApiKeyResponse:
        return await self._accounts.create_api_key(current_principal(), request)

    async def ListApiKeys(
        self, request: auth_pb2.ListApiKeysRequest, context: Any
    ) -> auth_pb2.ListApiKeysResponse:
        return await self._accounts.list_api_keys(current_principal(), request)

    async def RevokeApiKey(
        self, request: auth_pb2.RevokeApiKeyRequest, context: Any
    ) -> auth_pb2.RevokeApiKeyResponse:
        return await self._accounts.revoke_api_key(current_principal(), request)

    async def UpdateUser(
        self, request: auth_pb2.UpdateUserRequest, context: Any
    ) -> auth_pb2.UpdateUserResponse:
        return await self._accounts.update_user(current_principal(), request)

    async def DeleteMyAccount(
        self, request: auth_pb2.DeleteMyAccountRequest, context: Any
    ) -> auth_pb2.DeleteMyAccountResponse:
        return await self._accounts.deletion.delete_my_account(current_principal(), request)

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: Any
    ) -> auth_pb2.GetJwksResponse:
        return self._accounts.jwks()

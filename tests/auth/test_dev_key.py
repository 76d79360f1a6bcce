"""Dev mode's signing key: kept beside the database, so a restart keeps everyone signed in.

A reader following the README restarts ``make run``; with a key per process every
token they held was refused after it. The key now lives beside the SQLite file,
owner-only, and only dev mode ever reads or writes it.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import grpc
import pytest
from grpc import aio

from switchboard.api.auth.v1 import auth_pb2, auth_pb2_grpc
from switchboard.mesh import create_server, dev_key_ring
from switchboard.platform.config import ConfigError
from switchboard.platform.security.credentials import accesstokens, devkey
from switchboard.platform.security.credentials.accesstokens import SigningKey, private_key_pem
from switchboard.settings import Settings
from tests.conftest import CALL_DEADLINE_S, make_settings
from tests.kits.authkit import bearer, register

pytestmark = pytest.mark.service


def _settings(directory: Path, **overrides: object) -> Settings:
    return make_settings(database_url=f"sqlite+aiosqlite:///{directory}/app.db", **overrides)


async def _register(settings: Settings) -> str:
    """A new user's access token from a server on ``settings``, which then stops."""
    server, _ = await create_server(settings)
    await server.start()
    try:
        async with aio.insecure_channel(server.address) as channel:
            return (await register(channel)).tokens.access_token
    finally:
        await server.shutdown(grace=0)


async def _principal(settings: Settings, access: str) -> auth_pb2.GetPrincipalResponse:
    server, _ = await create_server(settings)
    await server.start()
    try:
        async with aio.insecure_channel(server.address) as channel:
            response: auth_pb2.GetPrincipalResponse = await auth_pb2_grpc.AuthServiceStub(
                channel
            ).GetPrincipal(
                auth_pb2.GetPrincipalRequest(), metadata=bearer(access), timeout=CALL_DEADLINE_S
            )
            return response
    finally:
        await server.shutdown(grace=0)


async def test_a_restarted_dev_server_accepts_the_tokens_it_issued(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path)
    with caplog.at_level(logging.WARNING, logger="switchboard.mesh"):
        access = await _register(settings)
    key_file = tmp_path / "app.dev-signing-key.pem"
    assert devkey.dev_key_path(settings.kernel.database_url.get_secret_value()) == key_file
    info = key_file.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    made = [r.getMessage() for r in caplog.records if "DEV MODE" in r.getMessage()]
    assert any(f"made a signing key and kept it in {key_file}" in m for m in made), made
    assert all("development only" in m for m in made)
    kept = key_file.read_bytes()

    me = await _principal(settings, access)  # the same database: the same key
    assert me.principal.user
    assert key_file.read_bytes() == kept


async def test_a_dev_server_with_a_new_data_directory_says_the_key_changed(
    tmp_path: Path,
) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    access = await _register(_settings(tmp_path / "old"))
    with pytest.raises(aio.AioRpcError) as caught:
        await _principal(_settings(tmp_path / "new"), access)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == accesstokens.UNKNOWN_KEY


def test_a_token_of_another_key_is_said_to_be_another_server_s_first() -> None:
    # Most such tokens are another deployment's: that is said before dev mode's new key.
    said = accesstokens.UNKNOWN_KEY
    assert said.startswith("the access token is not one this server issued")
    assert "another deployment's" in said
    assert said.index("another deployment's") < said.index("dev mode")
    assert "no longer has" not in said  # it may never have had it


async def test_outside_dev_mode_the_dev_key_is_neither_read_nor_written(tmp_path: Path) -> None:
    dev_access = await _register(_settings(tmp_path))
    key_file = tmp_path / "app.dev-signing-key.pem"
    key_file.chmod(0o644)  # a dev key file dev mode itself would refuse
    real = tmp_path / "k1.pem"
    real.write_bytes(private_key_pem(SigningKey.generate("k1")))
    production = _settings(
        tmp_path,
        dev_mode=False,
        secret_key="a-real-secret-that-is-long-enough-0000000",
        signing_keys=(str(real),),
    )
    with pytest.raises(aio.AioRpcError) as caught:
        await _principal(production, dev_access)
    assert caught.value.details() == accesstokens.UNKNOWN_KEY
    # Dev mode with keys of its own does not make one either.
    (tmp_path / "other").mkdir()
    await _register(_settings(tmp_path / "other", signing_keys=(str(real),)))
    assert not (tmp_path / "other" / "app.dev-signing-key.pem").exists()


def _refusal(settings: Settings) -> str:
    with pytest.raises(ConfigError) as caught:
        dev_key_ring(settings.kernel)
    return str(caught.value)


def test_a_dev_key_others_could_read_is_refused_not_repaired(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    key_file = tmp_path / "app.dev-signing-key.pem"
    first = dev_key_ring(settings.kernel).active.kid
    assert first.startswith("dev-")
    assert dev_key_ring(settings.kernel).active.kid == first
    key_file.chmod(0o640)
    message = _refusal(settings)
    assert f"chmod 600 {key_file}" in message
    assert "mode 0640" in message
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o640
    assert "PRIVATE KEY" not in message


def test_a_dev_key_that_is_a_link_or_not_a_key_is_refused(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    key_file = tmp_path / "app.dev-signing-key.pem"
    elsewhere = tmp_path / "elsewhere.pem"
    elsewhere.write_bytes(private_key_pem(SigningKey.generate("x")))
    elsewhere.chmod(0o600)
    key_file.symlink_to(elsewhere)
    assert "is a symbolic link" in _refusal(settings)
    key_file.unlink()
    key_file.write_bytes(b"not a key")
    key_file.chmod(0o600)
    assert "is not an unencrypted Ed25519 PEM" in _refusal(settings)


def test_a_dev_key_is_never_given_a_directory_of_its_own(tmp_path: Path) -> None:
    # The database's directory is missing: its opening says so; no key makes it.
    message = _refusal(_settings(tmp_path / "missing"))
    assert f"{tmp_path / 'missing'}, does not exist" in message
    assert not (tmp_path / "missing").exists()


def test_a_database_that_is_not_a_file_gets_a_key_of_its_process_own(tmp_path: Path) -> None:
    memory = make_settings(database_url="sqlite+aiosqlite:///:memory:")
    assert devkey.dev_key_path(memory.kernel.database_url.get_secret_value()) is None
    assert devkey.dev_key_path("postgresql+asyncpg://u:p@localhost/db") is None
    assert dev_key_ring(memory.kernel).active.kid != dev_key_ring(memory.kernel).active.kid

"""The S3 blob store's settings: checked at start, secrets never quoted, credentials
required outside dev mode."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from switchboard.context.files.blobs.s3 import S3BlobStore
from switchboard.context.files.blobs.stores import open_blob_store
from switchboard.context.files.settings import FileSettings
from switchboard.platform.config import ConfigError
from switchboard.settings import Settings

pytestmark = pytest.mark.unit

ENDPOINT = "http://127.0.0.1:8333"


def test_the_directory_store_needs_no_s3_settings() -> None:
    assert FileSettings().context_blob_store == "directory"
    # Leftover S3 values are harmless while the store is the directory.
    FileSettings(context_s3_endpoint="not a url", context_s3_bucket="B")


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({}, "SWITCHBOARD_CONTEXT_S3_ENDPOINT"),
        ({"context_s3_endpoint": "ftp://host"}, "SWITCHBOARD_CONTEXT_S3_ENDPOINT"),
        ({"context_s3_endpoint": "http://"}, "SWITCHBOARD_CONTEXT_S3_ENDPOINT"),
        ({"context_s3_endpoint": ENDPOINT, "context_s3_bucket": "Upper"}, "_S3_BUCKET"),
        ({"context_s3_endpoint": ENDPOINT, "context_s3_bucket": "a..b"}, "_S3_BUCKET"),
        ({"context_s3_endpoint": ENDPOINT, "context_s3_bucket": "ab"}, "_S3_BUCKET"),
        (
            {"context_s3_endpoint": ENDPOINT, "context_s3_access_key_id": "only-the-id"},
            "must be set together",
        ),
        (
            {"context_s3_endpoint": ENDPOINT, "context_s3_secret_access_key": "hunter2-secret"},
            "must be set together",
        ),
    ],
)
def test_s3_settings_are_checked(values: dict[str, str], named: str) -> None:
    # What the operator reads at start (load_settings): every problem, no value quoted.
    with pytest.raises(ConfigError, match=named) as refused:
        Settings.from_values(dev_mode=True, context_blob_store="s3", **values)
    assert "hunter2" not in str(refused.value)
    assert "only-the-id" not in str(refused.value)


def test_credentials_are_required_outside_dev_mode() -> None:
    settings = FileSettings(context_blob_store="s3", context_s3_endpoint=ENDPOINT)
    with pytest.raises(ConfigError, match=r"required .* outside dev mode"):
        open_blob_store(settings, database_url="sqlite+aiosqlite:///x.db", dev_mode=False)


async def test_the_factory_opens_the_s3_store() -> None:
    secret = "a-secret-that-is-never-shown"
    settings = FileSettings(
        context_blob_store="s3",
        context_s3_endpoint=ENDPOINT,
        context_s3_access_key_id=SecretStr("key-id"),
        context_s3_secret_access_key=SecretStr(secret),
    )
    assert secret not in repr(settings)
    for dev_mode in (False, True):
        store = open_blob_store(
            settings, database_url="sqlite+aiosqlite:///x.db", dev_mode=dev_mode
        )
        assert isinstance(store, S3BlobStore)
        assert store.kind == "s3"
        await store.close()
    # Dev mode takes an empty pair (the AWS SDK's own credential chain then applies).
    bare = FileSettings(context_blob_store="s3", context_s3_endpoint=ENDPOINT)
    store = open_blob_store(bare, database_url="sqlite+aiosqlite:///x.db", dev_mode=True)
    await store.close()

"""Where the directory blob store lives when nothing names it."""

from __future__ import annotations

from pathlib import Path

import pytest

from switchboard.context.files.blobs.stores import files_directory
from switchboard.context.files.settings import FileSettings

pytestmark = pytest.mark.unit

POSTGRES = "postgresql+asyncpg://switchboard@db.example/switchboard"


def test_a_named_directory_wins(tmp_path: Path) -> None:
    settings = FileSettings(context_files_dir=str(tmp_path / "blobs"))
    found = files_directory(settings, database_url=POSTGRES, dev_mode=False)
    assert found == tmp_path / "blobs"


def test_beside_a_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'switchboard.db'}"
    found = files_directory(FileSettings(), database_url=url, dev_mode=False)
    assert found == (tmp_path / "data" / "files").resolve()


def test_dev_mode_on_postgresql_is_a_temporary_directory() -> None:
    assert files_directory(FileSettings(), database_url=POSTGRES, dev_mode=True) is None


def test_postgresql_outside_dev_mode_starts_with_the_working_directory_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    found = files_directory(FileSettings(), database_url=POSTGRES, dev_mode=False)
    assert found == (tmp_path / "files").resolve()
    assert "SWITCHBOARD_CONTEXT_BLOB_STORE=s3" in caplog.text

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from generation.backends.local import LocalBackend
from generation.media import MediaStore
from generation.store import SqliteTaskStore
from tests.generation.gen_support import SMALL


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteTaskStore]:
    async with SqliteTaskStore(tmp_path / "tasks.db") as s:
        yield s


@pytest.fixture
def media(tmp_path: Path) -> MediaStore:
    return MediaStore(tmp_path / "media", "http://127.0.0.1:9/media")


@pytest.fixture
def small_backend() -> LocalBackend:
    return LocalBackend(SMALL)

"""Where results live on disk (`root/<task_id>/...`) and how they are addressed publicly.

Results store paths relative to the root, so moving the directory or changing the public base URL
never rewrites the database; `url()` makes them absolute when a status is served.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path
from urllib.parse import quote

from generation.models import Clock

__all__ = ["MediaStore"]

_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


class MediaStore:
    def __init__(self, root: str | Path, public_base_url: str, *, clock: Clock = time.time) -> None:
        self._root = Path(root).resolve()
        self._base = public_base_url.rstrip("/")
        self._clock = clock

    @property
    def root(self) -> Path:
        return self._root

    @property
    def public_base_url(self) -> str:
        return self._base

    def task_dir(self, task_id: str, *, create: bool = True) -> Path:
        if not _TASK_ID.fullmatch(task_id):
            raise ValueError(f"not a safe task id: {task_id!r}")
        path = self._root / task_id
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def relative(self, path: Path) -> str:
        """The media-relative POSIX path of a file inside the root (ValueError outside it)."""
        return path.resolve().relative_to(self._root).as_posix()

    def url(self, relative: str) -> str:
        return f"{self._base}/{quote(relative)}"

    def resolve(self, relative: str) -> Path | None:
        """The file behind a relative path, or None if it is missing or escapes the root."""
        candidate = (self._root / relative).resolve()
        if not candidate.is_relative_to(self._root) or not candidate.is_file():
            return None
        return candidate

    def remove(self, task_id: str) -> None:
        shutil.rmtree(self.task_dir(task_id, create=False), ignore_errors=True)

    async def prune(self, older_than_seconds: float) -> list[str]:
        """Delete task directories untouched for `older_than_seconds`; returns their task ids."""
        cutoff = self._clock() - older_than_seconds
        return await asyncio.to_thread(self._prune_sync, cutoff)

    def _prune_sync(self, cutoff: float) -> list[str]:
        removed: list[str] = []
        if not self._root.is_dir():
            return removed
        for entry in sorted(self._root.iterdir()):
            if not entry.is_dir() or entry.is_symlink() or not _TASK_ID.fullmatch(entry.name):
                continue
            newest = max(
                (p.stat().st_mtime for p in entry.rglob("*") if p.is_file()),
                default=entry.stat().st_mtime,
            )
            if newest < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed

"""MediaStore: safe task directories, relative paths and absolute URLs, retention pruning."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from generation.media import MediaStore


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_paths_and_urls(tmp_path: Path) -> None:
    media = MediaStore(tmp_path / "m", "https://gw.example/media/")
    folder = media.task_dir("abc123")
    assert folder == (tmp_path / "m" / "abc123").resolve() and folder.is_dir()
    video = folder / "video.mp4"
    video.write_bytes(b"x")
    rel = media.relative(video)
    assert rel == "abc123/video.mp4"
    assert media.url(rel) == "https://gw.example/media/abc123/video.mp4"
    assert media.resolve(rel) == video.resolve()
    assert media.resolve("abc123/missing.mp4") is None
    assert media.resolve("../outside.txt") is None
    (tmp_path / "outside.txt").write_text("secret")
    assert media.resolve("../../outside.txt") is None
    for bad in ("../x", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(ValueError):
            media.task_dir(bad)
    with pytest.raises(ValueError):
        media.relative(tmp_path / "outside.txt")


async def test_prune_removes_only_old_task_directories(tmp_path: Path) -> None:
    clock = Clock(1_000_000.0)
    media = MediaStore(tmp_path / "m", "http://h/media", clock=clock)
    for name, age in (("old", 7200), ("fresh", 60)):
        folder = media.task_dir(name)
        f = folder / "video.mp4"
        f.write_bytes(b"v")
        os.utime(f, (clock.now - age, clock.now - age))
        os.utime(folder, (clock.now - age, clock.now - age))
    (media.root / "stray-file").write_text("not a task dir")
    removed = await media.prune(3600)
    assert removed == ["old"]
    assert not (media.root / "old").exists()
    assert (media.root / "fresh" / "video.mp4").exists()
    assert (media.root / "stray-file").exists()
    media.remove("fresh")
    assert not (media.root / "fresh").exists()

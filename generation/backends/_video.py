"""Reading back a finished MP4: its real duration and codec, and a preview frame (blocking I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av

from generation.errors import BackendError


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    width: int
    height: int
    duration: float


def probe(path: Path) -> VideoInfo:
    try:
        with av.open(str(path)) as box:
            if not box.streams.video:
                raise BackendError("file has no video stream")
            stream: Any = box.streams.video[0]
            duration = float(box.duration) / 1_000_000 if box.duration is not None else 0.0
            return VideoInfo(
                codec=str(stream.codec_context.name),
                width=int(stream.codec_context.width),
                height=int(stream.codec_context.height),
                duration=duration,
            )
    except av.FFmpegError as exc:
        raise BackendError("video could not be read") from exc


def write_preview(video: Path, out: Path, *, at_seconds: float) -> None:
    """Save the first frame at or after `at_seconds` (seeking to the keyframe before it) as JPEG."""
    try:
        with av.open(str(video)) as box:
            stream: Any = box.streams.video[0]
            if at_seconds > 0:
                box.seek(int(at_seconds * 1_000_000))
            chosen = None
            for frame in box.decode(stream):
                chosen = frame
                if frame.time is None or frame.time + 1e-6 >= at_seconds:
                    break
            if chosen is None:
                raise BackendError("video has no frames")
            chosen.to_image().save(out, "JPEG", quality=85)
    except av.FFmpegError as exc:
        raise BackendError("preview could not be decoded") from exc

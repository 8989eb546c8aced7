"""The embedded renderer makes real H.264 MP4s: checked by decoding them with PyAV."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from generation.backends.local import LocalBackend, LocalSettings
from generation.errors import InvalidInput
from generation.models import GenerationRequest, Stage
from tests.generation.gen_support import SMALL, png_bytes


def _first_frame(path: Path) -> np.ndarray:
    with av.open(str(path)) as box:
        frame = next(box.decode(video=0))
        return frame.to_ndarray(format="rgb24")


def _last_frame(path: Path) -> np.ndarray:
    with av.open(str(path)) as box:
        last = None
        for frame in box.decode(video=0):
            last = frame
        assert last is not None
        return last.to_ndarray(format="rgb24")


async def test_four_second_render_is_real_h264_with_rising_progress(tmp_path: Path) -> None:
    backend = LocalBackend()
    loop_thread = threading.get_ident()
    seen: list[tuple[Stage, int]] = []

    def progress(stage: Stage, value: int) -> None:
        assert (
            threading.get_ident() == loop_thread
        )  # handed back to the loop, not the render thread
        seen.append((stage, value))

    # The loop stays responsive while the render thread works.
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    started = time.perf_counter()
    request = GenerationRequest(
        prompt="a lighthouse in a storm at night", model="local", duration=4
    )
    result = await backend.render(request, tmp_path / "out", progress)
    elapsed = time.perf_counter() - started
    tick_task.cancel()

    assert elapsed < 10, f"4 s render took {elapsed:.1f} s"
    assert ticks > elapsed / 0.01 * 0.5  # the event loop was never blocked for long

    with av.open(str(result.video)) as box:
        stream = box.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert (stream.codec_context.width, stream.codec_context.height) == (854, 480)
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert box.duration is not None
        assert float(box.duration) / 1_000_000 == pytest.approx(4.0, abs=1 / 24)
        assert sum(1 for _ in box.decode(video=0)) == 96
    assert result.duration == pytest.approx(4.0, abs=1 / 24)

    with Image.open(result.preview) as preview:
        preview.load()
        assert preview.size == (854, 480)
        assert preview.format == "JPEG"
    assert "lighthouse" in result.description.read_text()
    assert result.text.startswith("a lighthouse in a storm at night")
    assert result.template_name in {"aurora", "orbits", "ripples"}

    values = [v for _, v in seen]
    assert values == sorted(values)
    assert len(set(values)) >= 8
    stages = [s for s, _ in seen]
    assert stages[0] is Stage.PLANNING and stages[-1] is Stage.FINALIZING
    assert {Stage.RENDERING, Stage.ENCODING} <= set(stages)
    assert not list((tmp_path / "out").glob(".*part"))


async def test_image_input_is_the_first_frame(tmp_path: Path) -> None:
    colour = (30, 160, 220)
    request = GenerationRequest(
        prompt="ocean at dawn",
        model="local",
        duration=2,
        image=png_bytes(400, 300, colour),
    )
    result = await LocalBackend(SMALL).render(request, tmp_path, lambda s, v: None)
    first = _first_frame(result.video)
    # Above the caption band the first frame is the image itself (up to H.264/yuv420p rounding).
    top = first[: first.shape[0] // 2].reshape(-1, 3).mean(axis=0)
    assert np.abs(top - np.array(colour)).max() < 6, top
    # Later the prompt's scene has blended over it.
    last_top = _last_frame(result.video)[: first.shape[0] // 2].reshape(-1, 3).mean(axis=0)
    assert np.abs(last_top - np.array(colour)).max() > 15, last_top
    assert "supplied image" in result.text


async def test_different_prompts_render_different_videos(tmp_path: Path) -> None:
    backend = LocalBackend(LocalSettings(width=160, height=90))
    a = await backend.render(
        GenerationRequest(prompt="tree", model="local", duration=1),
        tmp_path / "a",
        lambda s, v: None,
    )
    b = await backend.render(
        GenerationRequest(prompt="moon", model="local", duration=1),
        tmp_path / "b",
        lambda s, v: None,
    )
    again = await backend.render(
        GenerationRequest(prompt="tree", model="local", duration=1),
        tmp_path / "c",
        lambda s, v: None,
    )
    assert a.template_name != b.template_name
    assert np.abs(_first_frame(a.video).astype(int) - _first_frame(b.video)).mean() > 10
    # Deterministic: a restarted task renders the same picture again.
    assert np.abs(_first_frame(a.video).astype(int) - _first_frame(again.video)).mean() < 1


async def test_cancel_stops_the_render_thread(tmp_path: Path) -> None:
    backend = LocalBackend(SMALL)
    request = GenerationRequest(prompt="long one", model="local", duration=60)
    job = asyncio.create_task(backend.render(request, tmp_path, lambda s, v: None))
    await asyncio.sleep(0.3)
    job.cancel()
    started = time.perf_counter()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert time.perf_counter() - started < 2  # stopped at the next frame, not after 60 s of video
    assert await asyncio.to_thread(os.listdir, tmp_path) == []  # no video, no partial file


async def test_undecodable_image_and_bad_duration_are_invalid_input(tmp_path: Path) -> None:
    backend = LocalBackend(SMALL)
    with pytest.raises(InvalidInput):
        await backend.render(
            GenerationRequest(prompt="x", model="local", duration=1, image=b"\x89PNG not really"),
            tmp_path,
            lambda s, v: None,
        )
    with pytest.raises(InvalidInput):
        await backend.render(
            GenerationRequest(prompt="x", model="local", duration=61), tmp_path, lambda s, v: None
        )
    with pytest.raises(ValueError):
        GenerationRequest(prompt="x", model="local", duration=0)

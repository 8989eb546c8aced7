"""UpstreamBackend against a real HTTP server speaking the OpenAI videos API.

The hosted provider cannot run here, so `fake_videos_api.FakeVideosAPI` implements its API for
real (uvicorn on 127.0.0.1, our own renderer behind it); the backend under test is unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from generation.backends.base import ModelRouter
from generation.backends.local import LocalBackend
from generation.backends.upstream import UpstreamBackend, UpstreamSettings
from generation.errors import BackendError, InvalidInput, UpstreamError
from generation.models import ErrorCode, GenerationRequest, Stage
from tests.generation.fake_videos_api import FakeVideosAPI
from tests.generation.gen_support import png_bytes, serve

KEY = "sk-test-not-a-real-key"


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[tuple[FakeVideosAPI, str]]:
    api = FakeVideosAPI(tmp_path / "provider", KEY)
    async with serve(api.app) as (port,):
        yield api, f"http://127.0.0.1:{port}/v1"


def _settings(base: str, **overrides: object) -> UpstreamSettings:
    values: dict[str, object] = {
        "base_url": base,
        "api_key": KEY,
        "models": {"cloud-video": "sora-2"},
        "size": "320x180",
        "poll_initial": 0.02,
        "poll_max": 0.05,
        "timeout": 30.0,
    }
    values.update(overrides)
    return UpstreamSettings(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def _backend(settings: UpstreamSettings) -> AsyncIterator[UpstreamBackend]:
    backend = UpstreamBackend(settings)
    try:
        yield backend
    finally:
        await backend.aclose()


async def test_render_maps_progress_and_rehosts_the_video(tmp_path: Path) -> None:
    api = FakeVideosAPI(tmp_path / "provider", KEY, report_every_step=True)
    async with serve(api.app) as (port,):
        await _render_and_check(api, f"http://127.0.0.1:{port}/v1", tmp_path)


async def _render_and_check(api: FakeVideosAPI, base: str, tmp_path: Path) -> None:
    seen: list[tuple[Stage, int]] = []
    async with _backend(_settings(base)) as backend:
        assert list(backend.models()) == ["cloud-video"]
        result = await backend.render(
            GenerationRequest(prompt="paper boats on a river", model="cloud-video", duration=2),
            tmp_path / "ours",
            lambda stage, value: seen.append((stage, value)),
        )

    (job,) = api.jobs.values()
    assert (job.model, job.seconds, job.size) == ("sora-2", "2", "320x180")
    assert set(api.seen_auth) == {f"Bearer {KEY}"}
    assert api.content_downloads == 1

    # Re-hosted: our own copy, byte-identical to the provider's file, under our directory.
    assert result.video == tmp_path / "ours" / "video.mp4"
    assert job.path is not None and result.video.read_bytes() == job.path.read_bytes()
    with av.open(str(result.video)) as box:
        assert box.streams.video[0].codec_context.name == "h264"
        assert box.duration is not None
        assert float(box.duration) / 1e6 == pytest.approx(2.0, abs=1 / 24)
    assert (result.width, result.height, result.template_name) == (320, 180, "sora-2")
    with Image.open(result.preview) as preview:
        preview.load()
        assert preview.size == (320, 180)

    values = [v for _, v in seen]
    assert values == sorted(values)
    rendering = {v for s, v in seen if s is Stage.RENDERING}
    assert len(rendering) >= 2 and all(5 <= v <= 85 for v in rendering), seen
    assert seen[-1] == (Stage.FINALIZING, 98)


async def test_image_input_is_sent_as_input_reference(
    provider: tuple[FakeVideosAPI, str], tmp_path: Path
) -> None:
    api, base = provider
    colour = (220, 60, 40)
    async with _backend(_settings(base)) as backend:
        result = await backend.render(
            GenerationRequest(
                prompt="lava", model="cloud-video", duration=1, image=png_bytes(320, 180, colour)
            ),
            tmp_path,
            lambda s, v: None,
        )
    (job,) = api.jobs.values()
    assert job.image is not None
    with av.open(str(result.video)) as box:
        first = next(box.decode(video=0)).to_ndarray(format="rgb24")
    top = first[:90].reshape(-1, 3).mean(axis=0)
    assert np.abs(top - np.array(colour)).max() < 6


async def test_provider_failure_and_refusals_are_typed(
    provider: tuple[FakeVideosAPI, str], tmp_path: Path
) -> None:
    _, base = provider
    async with _backend(_settings(base)) as backend:
        with pytest.raises(BackendError) as failed:
            await backend.render(
                GenerationRequest(prompt="[fail] please", model="cloud-video", duration=1),
                tmp_path / "a",
                lambda s, v: None,
            )
        assert failed.value.code is ErrorCode.BACKEND_ERROR
        assert "the prompt was rejected" in failed.value.message
        assert not (tmp_path / "a" / "video.mp4").exists()

        with pytest.raises(InvalidInput):
            await backend.render(
                GenerationRequest(prompt="x", model="cloud-video", duration=99),
                tmp_path / "b",
                lambda s, v: None,
            )
        with pytest.raises(InvalidInput):
            await backend.render(
                GenerationRequest(prompt="x", model="not-served", duration=1),
                tmp_path / "c",
                lambda s, v: None,
            )

    async with _backend(_settings(base, api_key="sk-wrong")) as backend:
        with pytest.raises(UpstreamError) as refused:
            await backend.render(
                GenerationRequest(prompt="x", model="cloud-video", duration=1),
                tmp_path / "d",
                lambda s, v: None,
            )
        assert refused.value.code is ErrorCode.UPSTREAM_ERROR
        assert "sk-wrong" not in str(refused.value)

    # Nothing listens on this port any more: an unreachable provider is an upstream error.
    async with _backend(_settings("http://127.0.0.1:9/v1", poll_initial=0.01)) as backend:
        with pytest.raises(UpstreamError):
            await backend.render(
                GenerationRequest(prompt="x", model="cloud-video", duration=1),
                tmp_path / "e",
                lambda s, v: None,
            )


async def test_router_sends_each_model_to_its_backend(
    provider: tuple[FakeVideosAPI, str], tmp_path: Path
) -> None:
    api, base = provider
    async with _backend(_settings(base)) as upstream:
        router = ModelRouter([LocalBackend(), upstream])
        assert sorted(router.models()) == ["cloud-video", "local"]
        await router.render(
            GenerationRequest(prompt="via router", model="cloud-video", duration=1),
            tmp_path,
            lambda s, v: None,
        )
        assert len(api.jobs) == 1
        with pytest.raises(InvalidInput):
            await router.render(
                GenerationRequest(prompt="x", model="nobody", duration=1),
                tmp_path,
                lambda s, v: None,
            )
    with pytest.raises(ValueError):
        ModelRouter([LocalBackend(), LocalBackend()])

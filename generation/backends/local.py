"""The embedded renderer: a real H.264 MP4 drawn from the prompt, no provider needed.

Visuals are deterministic in the prompt (a SHA-256 of it seeds the template, palette and motion),
so a task restarted after a crash renders the same video again. Frames are generated one at a time
with numpy and streamed into libx264 through PyAV; the whole video is never held in memory.
All CPU work runs in a worker thread; progress goes back to the event loop thread-safely and a
cancelled render stops at the next frame.
"""

from __future__ import annotations

import asyncio
import colorsys
import contextlib
import hashlib
import io
import math
import os
import threading
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from generation.backends._video import probe
from generation.backends.base import ProgressCallback, RenderResult
from generation.errors import BackendError, InvalidInput
from generation.models import ErrorCode, GenerationRequest, Stage

__all__ = ["TEMPLATES", "LocalBackend", "LocalSettings"]

FloatImage = npt.NDArray[np.float32]
TEMPLATES = ("aurora", "orbits", "ripples")

VIDEO_NAME = "video.mp4"
PREVIEW_NAME = "preview.jpg"
DESCRIPTION_NAME = "description.txt"


@dataclass(frozen=True)
class LocalSettings:
    models: tuple[str, ...] = ("local",)
    width: int = 854
    height: int = 480
    fps: int = 24
    max_duration: int = 60
    preset: str = "ultrafast"
    crf: int = 23
    # Refuse to decode an input image bigger than this (decompression bombs).
    max_image_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        if self.width % 2 or self.height % 2 or self.width < 16 or self.height < 16:
            raise ValueError("width and height must be even and at least 16 (yuv420p)")
        if not 1 <= self.fps <= 60:
            raise ValueError("fps must be within 1..60")


class _Cancelled(Exception):
    pass


class LocalBackend:
    def __init__(self, settings: LocalSettings | None = None) -> None:
        self._settings = settings or LocalSettings()

    @property
    def settings(self) -> LocalSettings:
        return self._settings

    def models(self) -> Sequence[str]:
        return list(self._settings.models)

    async def render(
        self, request: GenerationRequest, out_dir: Path, progress: ProgressCallback
    ) -> RenderResult:
        if not 1 <= request.duration <= self._settings.max_duration:
            raise InvalidInput(f"duration must be within 1..{self._settings.max_duration} seconds")
        loop = asyncio.get_running_loop()

        def report(stage: Stage, value: int) -> None:
            # Called from the render thread; the callback itself runs on the loop.
            with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
                loop.call_soon_threadsafe(progress, stage, value)

        cancel = threading.Event()
        job = asyncio.ensure_future(
            asyncio.to_thread(render_to_directory, request, out_dir, self._settings, report, cancel)
        )
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            # Stop the thread at its next frame and wait for it, so no render outlives its task.
            cancel.set()
            await asyncio.wait([job])
            if not job.cancelled():
                job.exception()  # mark retrieved; the cancellation is what matters here
            raise


def render_to_directory(
    request: GenerationRequest,
    out_dir: Path,
    settings: LocalSettings,
    report: Callable[[Stage, int], None],
    cancel: threading.Event | None = None,
) -> RenderResult:
    """Blocking render (call it in a thread). Writes video, preview and description to `out_dir`."""
    cancel = cancel or threading.Event()
    out_dir.mkdir(parents=True, exist_ok=True)
    report(Stage.PLANNING, 2)
    plan = _Plan.from_request(request, settings)
    background = _decode_background(request.image, settings) if request.image else None
    caption = _Caption.build(plan.caption_text, settings.width, settings.height)
    report(Stage.PLANNING, 5)

    video = out_dir / VIDEO_NAME
    partial = out_dir / f".{VIDEO_NAME}.part"
    n_frames = request.duration * settings.fps
    try:
        middle = _encode(plan, background, caption, partial, n_frames, settings, report, cancel)
        report(Stage.FINALIZING, 94)
        info = probe(partial)
        expected = n_frames / settings.fps
        if info.codec != "h264" or abs(info.duration - expected) > 1.0 / settings.fps:
            raise BackendError(
                f"encoder produced {info.codec} of {info.duration:.3f}s,"
                f" expected h264 of {expected:.3f}s",
                code=ErrorCode.INTERNAL,
            )
        os.replace(partial, video)
    finally:
        partial.unlink(missing_ok=True)

    preview = out_dir / PREVIEW_NAME
    Image.fromarray(middle, "RGB").save(preview, "JPEG", quality=85)
    text = plan.describe(request, settings, with_image=background is not None)
    description = out_dir / DESCRIPTION_NAME
    description.write_text(text + "\n", encoding="utf-8")
    report(Stage.FINALIZING, 98)
    return RenderResult(
        video=video,
        preview=preview,
        description=description,
        text=text,
        template_name=plan.template,
        width=settings.width,
        height=settings.height,
        duration=info.duration,
    )


def _encode(
    plan: _Plan,
    background: FloatImage | None,
    caption: _Caption | None,
    path: Path,
    n_frames: int,
    settings: LocalSettings,
    report: Callable[[Stage, int], None],
    cancel: threading.Event,
) -> npt.NDArray[np.uint8]:
    """Stream frames into libx264; returns the middle frame (for the preview)."""
    width, height, fps = settings.width, settings.height, settings.fps
    scene = _Scene(plan, width, height)
    middle: npt.NDArray[np.uint8] | None = None
    # Report about every tenth of the frames: distinct, rising values without flooding the loop.
    step = max(1, n_frames // 10)
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as box:
        stream: Any = box.add_stream("libx264", rate=fps)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": settings.preset, "crf": str(settings.crf)}
        for index in range(n_frames):
            if cancel.is_set():
                raise _Cancelled
            t = index / fps
            rgb = scene.frame(t)
            if background is not None:
                # The input image is the first frame; the scene fades in over it and the image
                # stays visible as the background.
                mix = np.float32(0.65 * min(1.0, t / max(0.5, 0.6 * n_frames / fps)))
                rgb = background + (rgb - background) * mix
            if caption is not None:
                caption.composite(rgb)
            pixels = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
            if index == n_frames // 2:
                middle = pixels.copy()
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                box.mux(packet)
            if (index + 1) % step == 0 or index + 1 == n_frames:
                report(Stage.RENDERING, 5 + (80 * (index + 1)) // n_frames)
        report(Stage.ENCODING, 87)
        for packet in stream.encode(None):
            box.mux(packet)
        report(Stage.ENCODING, 90)
    assert middle is not None
    return middle


def _decode_background(data: bytes, settings: LocalSettings) -> FloatImage:
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > settings.max_image_pixels:
                raise InvalidInput("image has too many pixels")
            img.load()
            upright = ImageOps.exif_transpose(img)
            if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
                rgba = upright.convert("RGBA")
                flat = Image.new("RGB", rgba.size, (0, 0, 0))
                flat.paste(rgba, mask=rgba.getchannel("A"))
                upright = flat
            fitted = ImageOps.fit(
                upright.convert("RGB"), (settings.width, settings.height), Image.Resampling.LANCZOS
            )
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInput("image could not be decoded") from exc
    return np.asarray(fitted, dtype=np.float32) / np.float32(255.0)


_HUE_NAMES = (
    (15, "red"),
    (40, "orange"),
    (65, "gold"),
    (150, "green"),
    (190, "teal"),
    (250, "blue"),
    (290, "violet"),
    (335, "magenta"),
    (360, "red"),
)

_ENHANCEMENTS = (
    "cinematic lighting",
    "slow dolly-in",
    "soft volumetric haze",
    "shallow depth of field",
    "golden-hour glow",
    "smooth parallax drift",
)


def _hue_name(hue: float) -> str:
    degrees = hue * 360.0
    return next(name for limit, name in _HUE_NAMES if degrees < limit)


@dataclass(frozen=True)
class _Plan:
    """Everything the prompt decides, derived once from its hash."""

    template: str
    hues: tuple[float, float, float]
    palette: tuple[tuple[float, float, float], ...]
    speeds: tuple[float, ...]
    phases: tuple[float, ...]
    caption_text: str
    seed: bytes

    @classmethod
    def from_request(cls, request: GenerationRequest, settings: LocalSettings) -> _Plan:
        seed = hashlib.sha256(request.prompt.encode("utf-8")).digest()
        rng = np.random.default_rng(int.from_bytes(seed[:16], "big"))
        template = TEMPLATES[seed[0] % len(TEMPLATES)]
        base = float(rng.random())
        hues = (base, (base + 0.18 + 0.2 * float(rng.random())) % 1.0, (base + 0.5) % 1.0)
        palette = tuple(
            colorsys.hsv_to_rgb(
                h, 0.55 + 0.4 * float(rng.random()), 0.55 + 0.4 * float(rng.random())
            )
            for h in hues
        )
        speeds = tuple(float(x) for x in rng.uniform(0.4, 1.6, size=8))
        phases = tuple(float(x) for x in rng.uniform(0.0, 2 * math.pi, size=8))
        return cls(template, hues, palette, speeds, phases, _clean_caption(request.prompt), seed)

    def describe(
        self, request: GenerationRequest, settings: LocalSettings, *, with_image: bool
    ) -> str:
        names = []
        for hue in self.hues:
            name = _hue_name(hue)
            if name not in names:
                names.append(name)
        colours = ", ".join(names[:-1]) + (" and " if len(names) > 1 else "") + names[-1]
        subject = self.caption_text or "an abstract scene"
        text = (
            f"{subject}. A {request.duration}-second {self.template} animation in {colours}"
            f" ({settings.width}x{settings.height}, {settings.fps} fps)"
        )
        if with_image:
            text += ", opening on the supplied image"
        if request.auto_enhance:
            picks = sorted({_ENHANCEMENTS[b % len(_ENHANCEMENTS)] for b in self.seed[1:3]})
            text += "; enhanced with " + " and ".join(picks)
        return text + "."


def _clean_caption(prompt: str) -> str:
    printable = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in prompt)
    return " ".join(printable.split())


class _Scene:
    """Per-frame pixels for the planned template; coordinate grids are built once."""

    def __init__(self, plan: _Plan, width: int, height: int) -> None:
        self._plan = plan
        self._w = width
        self._h = height
        aspect = width / height
        xs = np.linspace(-aspect, aspect, width, dtype=np.float32)
        ys = np.linspace(-1.0, 1.0, height, dtype=np.float32)
        self._x = xs[None, :]
        self._y = ys[:, None]
        self._colours = [np.asarray(c, dtype=np.float32) for c in plan.palette]
        # Vertical vignette shared by all templates.
        self._shade = (1.0 - 0.35 * self._y**2).astype(np.float32)[..., None]

    def frame(self, t: float) -> FloatImage:
        if self._plan.template == "aurora":
            return self._aurora(t)
        if self._plan.template == "orbits":
            return self._orbits(t)
        return self._ripples(t)

    def _blend(self, field: FloatImage, a: int, b: int) -> FloatImage:
        c0, c1 = self._colours[a], self._colours[b]
        out: FloatImage = c0 + field[..., None] * (c1 - c0)
        return out

    def _aurora(self, t: float) -> FloatImage:
        s, p = self._plan.speeds, self._plan.phases
        warp = np.sin(self._x * 1.7 + t * s[0] + p[0]) * 0.35
        bands = np.sin((self._y + warp) * 4.0 - t * s[1] + p[1])
        field = (0.5 + 0.5 * bands).astype(np.float32)
        rgb = self._blend(field, 0, 1)
        glow = np.exp(-(((self._y - 0.3 * math.sin(t * s[2] + p[2])) * 3.0) ** 2)).astype(
            np.float32
        )
        rgb += glow[..., None] * self._colours[2] * np.float32(0.35)
        out: FloatImage = np.clip(rgb * self._shade, 0.0, 1.0)
        return out

    def _orbits(self, t: float) -> FloatImage:
        s, p = self._plan.speeds, self._plan.phases
        field = (0.5 + 0.5 * np.sin(self._x * 0.8 + self._y * 0.6 + t * 0.3 * s[0])).astype(
            np.float32
        )
        rgb = self._blend(field * np.float32(0.5), 0, 1) * np.float32(0.6)
        aspect = self._w / self._h
        for k in range(4):
            angle = t * s[k + 1] * (1 if k % 2 else -1) + p[k + 1]
            radius = 0.25 + 0.17 * k
            cx = math.cos(angle) * radius * aspect * 0.8
            cy = math.sin(angle) * radius
            size = 0.12 + 0.05 * ((k + 1) % 3)
            self._disc(rgb, cx, cy, size, self._colours[(k + 2) % 3])
        out: FloatImage = np.clip(rgb * self._shade, 0.0, 1.0)
        return out

    def _disc(self, rgb: FloatImage, cx: float, cy: float, size: float, colour: FloatImage) -> None:
        # Soft-edged disc drawn only inside its bounding box.
        half_w, half_h = self._w / 2, self._h / 2
        px = int((cx / (self._w / self._h)) * half_w + half_w)
        py = int(cy * half_h + half_h)
        r = int(size * 1.3 * half_h) + 2
        x0, x1 = max(0, px - r), min(self._w, px + r)
        y0, y1 = max(0, py - r), min(self._h, py + r)
        if x0 >= x1 or y0 >= y1:
            return
        dx = self._x[:, x0:x1] - np.float32(cx)
        dy = self._y[y0:y1, :] - np.float32(cy)
        dist = np.sqrt(dx * dx + dy * dy)
        alpha = np.clip((size - dist) / np.float32(size * 0.25), 0.0, 1.0)[..., None]
        region = rgb[y0:y1, x0:x1]
        region += (colour - region) * alpha

    def _ripples(self, t: float) -> FloatImage:
        s, p = self._plan.speeds, self._plan.phases
        ax, ay = 0.7 * math.cos(t * 0.5 * s[0] + p[0]), 0.5 * math.sin(t * 0.4 * s[1] + p[1])
        bx, by = -0.8 * math.cos(t * 0.3 * s[2] + p[2]), 0.4 * math.cos(t * 0.6 * s[3] + p[3])
        d1 = np.sqrt((self._x - np.float32(ax)) ** 2 + (self._y - np.float32(ay)) ** 2)
        d2 = np.sqrt((self._x - np.float32(bx)) ** 2 + (self._y - np.float32(by)) ** 2)
        waves = np.sin(d1 * 14.0 - t * 4.0 * s[4]) + np.sin(d2 * 11.0 - t * 3.0 * s[5])
        field = (0.5 + 0.25 * waves).astype(np.float32)
        rgb = self._blend(field, 0, 2)
        out: FloatImage = np.clip(rgb * self._shade, 0.0, 1.0)
        return out


class _Caption:
    """The prompt drawn once with Pillow; per frame only its band is alpha-composited."""

    def __init__(self, top: int, alpha: FloatImage, premultiplied: FloatImage) -> None:
        self._top = top
        self._keep = np.float32(1.0) - alpha
        self._add = premultiplied

    @classmethod
    def build(cls, text: str, width: int, height: int) -> _Caption | None:
        if not text:
            return None
        size = max(12, height // 18)
        font = ImageFont.load_default(size=size)
        margin = size
        lines = _wrap(text, font, width - 2 * margin, max_lines=2)
        line_h = int(size * 1.3)
        band_h = line_h * len(lines) + margin
        band = Image.new("RGBA", (width, band_h), (0, 0, 0, 110))
        draw = ImageDraw.Draw(band)
        for i, line in enumerate(lines):
            draw.text(
                (margin, margin // 2 + i * line_h), line, font=font, fill=(255, 255, 255, 255)
            )
        rgba = np.asarray(band, dtype=np.float32) / np.float32(255.0)
        alpha = rgba[..., 3:4]
        return cls(height - band_h, alpha, rgba[..., :3] * alpha)

    def composite(self, rgb: FloatImage) -> None:
        region = rgb[self._top :]
        region *= self._keep
        region += self._add


def _wrap(
    text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, limit: int, *, max_lines: int
) -> list[str]:
    lines: list[str] = []
    current = ""
    words = text.split()
    for i, word in enumerate(words):
        candidate = f"{current} {word}".strip()
        if font.getlength(candidate) <= limit:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        if len(lines) == max_lines:
            current = ""
            lines[-1] = _ellipsize(" ".join([lines[-1], *words[i:]]), font, limit)
            break
    if current:
        lines.append(current)
    lines = [_ellipsize(line, font, limit) for line in lines[:max_lines]]
    return lines


def _ellipsize(line: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, limit: int) -> str:
    if font.getlength(line) <= limit:
        return line
    while line and font.getlength(line + "…") > limit:
        line = line[:-1]
    return line.rstrip() + "…"

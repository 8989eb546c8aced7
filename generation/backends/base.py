"""The seam between the worker and whatever makes the video.

A backend writes `video.mp4`, a preview image and a description into the directory it is given and
returns a `RenderResult` with absolute paths; the worker turns them into media-relative paths.
Failures are `BackendError`s (see `generation.errors`) carrying an `ErrorCode`.

`ProgressCallback` is always called on the event loop thread: a backend that works in another
thread hands its reports back with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from generation.errors import InvalidInput
from generation.models import GenerationRequest, Stage

__all__ = ["Backend", "ModelRouter", "ProgressCallback", "RenderResult"]

ProgressCallback = Callable[[Stage, int], None]


@dataclass(frozen=True)
class RenderResult:
    video: Path
    preview: Path
    description: Path
    text: str
    template_name: str
    width: int
    height: int
    duration: float


class Backend(Protocol):
    def models(self) -> Sequence[str]: ...

    async def render(
        self, request: GenerationRequest, out_dir: Path, progress: ProgressCallback
    ) -> RenderResult: ...


class ModelRouter:
    """A `Backend` that sends each request to the backend serving its model."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        self._by_model: dict[str, Backend] = {}
        for backend in backends:
            for model in backend.models():
                if model in self._by_model:
                    raise ValueError(f"model {model!r} is served by two backends")
                self._by_model[model] = backend

    def models(self) -> Sequence[str]:
        return list(self._by_model)

    async def render(
        self, request: GenerationRequest, out_dir: Path, progress: ProgressCallback
    ) -> RenderResult:
        backend = self._by_model.get(request.model)
        if backend is None:
            raise InvalidInput(f"unknown model {request.model!r}")
        return await backend.render(request, out_dir, progress)

"""Backends that turn a `GenerationRequest` into a video: embedded renderer and HTTP upstream."""

from __future__ import annotations

from generation.backends.base import Backend, ModelRouter, ProgressCallback, RenderResult
from generation.backends.local import LocalBackend, LocalSettings
from generation.backends.upstream import UpstreamBackend, UpstreamSettings

__all__ = [
    "Backend",
    "LocalBackend",
    "LocalSettings",
    "ModelRouter",
    "ProgressCallback",
    "RenderResult",
    "UpstreamBackend",
    "UpstreamSettings",
]

"""Value types of a generation task: states, stages, error codes, the request and the task itself.

Everything here is immutable; the store hands out new snapshots instead of mutating old ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "TERMINAL_STATES",
    "Clock",
    "ErrorCode",
    "GenerationRequest",
    "Stage",
    "Task",
    "TaskResult",
    "TaskState",
]

Clock = Callable[[], float]
"""Seconds since the epoch; injected so tests and logic never read the wall clock themselves."""


class TaskState(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({TaskState.COMPLETED, TaskState.FAILED})


class Stage(StrEnum):
    PLANNING = "planning"
    RENDERING = "rendering"
    ENCODING = "encoding"
    FINALIZING = "finalizing"


class ErrorCode(StrEnum):
    """The fixed list of failure codes a status may show."""

    BACKEND_ERROR = "backend_error"
    TIMEOUT = "timeout"
    INVALID_INPUT = "invalid_input"
    UPSTREAM_ERROR = "upstream_error"
    INTERRUPTED = "interrupted"
    INTERNAL = "internal"


@dataclass(frozen=True)
class GenerationRequest:
    """What to render. `image` is already fetched and size-checked (see `generation.fetch`)."""

    prompt: str
    model: str
    duration: int
    image: bytes | None = None
    auto_enhance: bool = False
    template_data: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.duration, bool) or not isinstance(self.duration, int):
            raise TypeError("duration must be an int number of seconds")
        if self.duration < 1:
            raise ValueError("duration must be at least 1 second")


@dataclass(frozen=True)
class TaskResult:
    """Output of a completed task; paths are relative to the media root (see `MediaStore.url`)."""

    text: str
    video_path: str
    image_path: str
    template_name: str
    width: int
    height: int
    duration: float


@dataclass(frozen=True)
class Task:
    id: str
    state: TaskState
    request: GenerationRequest
    created_at: float
    updated_at: float
    stage: Stage | None = None
    progress: int = 0
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    error_code: ErrorCode | None = None
    error_message: str | None = None
    result: TaskResult | None = None
    payment_ref: str | None = None
    webhook_url: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state.terminal

"""The paid work: tasks, their store, workers with stages and progress, and the backends.

Imports nothing from `payments` or `gateway`; the gateway links payments to tasks through the
opaque `payment_ref` and reacts to outcomes through `WorkerPool.add_listener`.
"""

from __future__ import annotations

from generation.backends import (
    Backend,
    LocalBackend,
    LocalSettings,
    ModelRouter,
    ProgressCallback,
    RenderResult,
    UpstreamBackend,
    UpstreamSettings,
)
from generation.errors import (
    BackendError,
    FetchError,
    GenerationError,
    InvalidInput,
    InvalidTransition,
    TaskExists,
    TaskNotFound,
    UnsafeAddress,
    UpstreamError,
)
from generation.fetch import FetchedImage, FetchLimits, ImageFetcher
from generation.media import MediaStore
from generation.models import (
    Clock,
    ErrorCode,
    GenerationRequest,
    Stage,
    Task,
    TaskResult,
    TaskState,
)
from generation.netguard import AddressPolicy, guarded_client, resolve_target
from generation.store import SqliteTaskStore, TaskStore
from generation.webhooks import (
    EVENT_COMPLETED,
    EVENT_FAILED,
    DeliveryResult,
    WebhookSender,
    WebhookSettings,
    event_type_for,
    generate_secret,
)
from generation.worker import Listener, WorkerPool

__all__ = [
    "EVENT_COMPLETED",
    "EVENT_FAILED",
    "AddressPolicy",
    "Backend",
    "BackendError",
    "Clock",
    "DeliveryResult",
    "ErrorCode",
    "FetchError",
    "FetchLimits",
    "FetchedImage",
    "GenerationError",
    "GenerationRequest",
    "ImageFetcher",
    "InvalidInput",
    "InvalidTransition",
    "Listener",
    "LocalBackend",
    "LocalSettings",
    "MediaStore",
    "ModelRouter",
    "ProgressCallback",
    "RenderResult",
    "SqliteTaskStore",
    "Stage",
    "Task",
    "TaskExists",
    "TaskNotFound",
    "TaskResult",
    "TaskState",
    "TaskStore",
    "UnsafeAddress",
    "UpstreamBackend",
    "UpstreamError",
    "UpstreamSettings",
    "WebhookSender",
    "WebhookSettings",
    "WorkerPool",
    "event_type_for",
    "generate_secret",
    "guarded_client",
    "resolve_target",
]

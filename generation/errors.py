"""Exceptions raised by the generation package.

    GenerationError                  base of everything below
      TaskNotFound                   no task with that id
      TaskExists                     a task with the id the caller chose already exists
      InvalidTransition              a state change the task lifecycle forbids
      BackendError                   .code: ErrorCode, .message: safe to show to the payer
        InvalidInput                 the request cannot be rendered (bad image, bad duration)
          FetchError                 the image input could not be fetched or decoded
            UnsafeAddress            a URL points at an address the policy refuses
        UpstreamError                the HTTP provider misbehaved or refused (code upstream_error)

A backend raises `BackendError` (or a subclass); the worker turns it into `failed(code, message)`.
Anything else escaping a backend is recorded as `internal` without its text, so no stack detail
leaks into a public status.
"""

from __future__ import annotations

from generation.models import ErrorCode

__all__ = [
    "BackendError",
    "FetchError",
    "GenerationError",
    "InvalidInput",
    "InvalidTransition",
    "TaskExists",
    "TaskNotFound",
    "UnsafeAddress",
    "UpstreamError",
]


class GenerationError(Exception):
    pass


class TaskNotFound(GenerationError, KeyError):
    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id

    def __str__(self) -> str:
        return f"task {self.task_id!r} not found"


class TaskExists(GenerationError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} already exists")
        self.task_id = task_id


class InvalidTransition(GenerationError):
    def __init__(self, task_id: str, state: str, action: str) -> None:
        super().__init__(f"task {task_id!r} is {state}; cannot {action}")
        self.task_id = task_id
        self.state = state
        self.action = action


class BackendError(GenerationError):
    code: ErrorCode = ErrorCode.BACKEND_ERROR

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidInput(BackendError):
    code = ErrorCode.INVALID_INPUT


class FetchError(InvalidInput):
    """`reason` is a short machine-readable tag (e.g. `too_large`, `bad_type`, `unsafe_address`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnsafeAddress(FetchError):
    def __init__(self, message: str) -> None:
        super().__init__("unsafe_address", message)


class UpstreamError(BackendError):
    code = ErrorCode.UPSTREAM_ERROR

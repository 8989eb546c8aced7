"""Durable task storage behind one small interface (SQLite now; PostgreSQL later).

Invariants the store enforces itself, so every caller gets them for free:
- states move only `queued -> processing -> completed | failed` (and `queued -> failed`); a
  `processing` task may be started again (restart after a crash), terminal tasks never change;
- `progress` never falls: an update with a lower value keeps the higher one, also across restarts;
- each transition is a single conditional UPDATE, so two writers cannot both win.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import aiosqlite

from generation.errors import InvalidTransition, TaskExists, TaskNotFound
from generation.models import (
    Clock,
    ErrorCode,
    GenerationRequest,
    Stage,
    Task,
    TaskResult,
    TaskState,
)

__all__ = ["SqliteTaskStore", "TaskStore"]


class TaskStore(Protocol):
    async def create(
        self,
        request: GenerationRequest,
        *,
        webhook_url: str | None = None,
        payment_ref: str | None = None,
        task_id: str | None = None,
    ) -> Task: ...

    async def get(self, task_id: str) -> Task | None: ...

    async def start(self, task_id: str) -> Task:
        """`queued|processing -> processing`; counts an attempt. Restarting resets nothing else."""
        ...

    async def update_progress(self, task_id: str, stage: Stage, progress: int) -> Task: ...

    async def complete(self, task_id: str, result: TaskResult) -> Task: ...

    async def fail(self, task_id: str, code: ErrorCode, message: str) -> Task: ...

    async def link_payment(self, task_id: str, payment_ref: str) -> Task: ...

    async def list_unfinished(self) -> list[Task]:
        """Queued and processing tasks, oldest first (restart recovery)."""
        ...

    async def list_failed_since(self, since: float) -> list[Task]:
        """Failed tasks finished at or after `since` (the gateway re-checks their refunds)."""
        ...

    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id            TEXT PRIMARY KEY,
    state         TEXT NOT NULL CHECK (state IN ('queued','processing','completed','failed')),
    stage         TEXT,
    progress      INTEGER NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    attempts      INTEGER NOT NULL DEFAULT 0,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    started_at    REAL,
    finished_at   REAL,
    error_code    TEXT,
    error_message TEXT,
    prompt        TEXT NOT NULL,
    model         TEXT NOT NULL,
    duration      INTEGER NOT NULL,
    auto_enhance  INTEGER NOT NULL,
    template_data TEXT NOT NULL,
    image         BLOB,
    result        TEXT,
    payment_ref   TEXT,
    webhook_url   TEXT
);
CREATE INDEX IF NOT EXISTS tasks_unfinished ON tasks (created_at)
    WHERE state IN ('queued', 'processing');
CREATE INDEX IF NOT EXISTS tasks_failed ON tasks (finished_at) WHERE state = 'failed';
"""

_SCHEMA_VERSION = 1


def _new_id() -> str:
    return uuid.uuid4().hex


class SqliteTaskStore:
    """`TaskStore` on one aiosqlite connection in WAL mode, autocommit (one statement = one txn)."""

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Clock = time.time,
        id_factory: Callable[[], str] = _new_id,
    ) -> None:
        self._path = str(path)
        self._clock = clock
        self._id_factory = id_factory
        self._conn: aiosqlite.Connection | None = None

    async def open(self) -> Self:
        conn = await aiosqlite.connect(self._path, isolation_level=None)
        conn.row_factory = aiosqlite.Row
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=NORMAL")
            await conn.execute("PRAGMA busy_timeout=5000")
            await conn.executescript(_SCHEMA)
            await conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        return self

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def _db(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError("SqliteTaskStore is not open")
        return self._conn

    async def create(
        self,
        request: GenerationRequest,
        *,
        webhook_url: str | None = None,
        payment_ref: str | None = None,
        task_id: str | None = None,
    ) -> Task:
        now = self._clock()
        tid = task_id or self._id_factory()
        template_data = json.dumps(dict(request.template_data), separators=(",", ":"))
        try:
            rows = await self._insert(tid, now, request, template_data, payment_ref, webhook_url)
        except sqlite3.IntegrityError as exc:
            if task_id is not None and await self.get(task_id) is not None:
                raise TaskExists(task_id) from exc
            raise
        for row in rows:
            return _row_to_task(row)
        raise RuntimeError("INSERT ... RETURNING returned no row")

    async def _insert(
        self,
        tid: str,
        now: float,
        request: GenerationRequest,
        template_data: str,
        payment_ref: str | None,
        webhook_url: str | None,
    ) -> Any:
        return await self._db.execute_fetchall(
            "INSERT INTO tasks (id, state, progress, attempts, created_at, updated_at, prompt,"
            " model, duration, auto_enhance, template_data, image, payment_ref, webhook_url)"
            " VALUES (?, 'queued', 0, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
            (
                tid,
                now,
                now,
                request.prompt,
                request.model,
                request.duration,
                int(request.auto_enhance),
                template_data,
                request.image,
                payment_ref,
                webhook_url,
            ),
        )

    async def get(self, task_id: str) -> Task | None:
        rows = await self._db.execute_fetchall("SELECT * FROM tasks WHERE id = ?", (task_id,))
        for row in rows:
            return _row_to_task(row)
        return None

    async def start(self, task_id: str) -> Task:
        now = self._clock()
        return await self._transition(
            task_id,
            "start",
            "UPDATE tasks SET state = 'processing', stage = ?, attempts = attempts + 1,"
            " started_at = ?, updated_at = ? WHERE id = ? AND state IN ('queued', 'processing')"
            " RETURNING *",
            (Stage.PLANNING.value, now, now, task_id),
        )

    async def update_progress(self, task_id: str, stage: Stage, progress: int) -> Task:
        _check_progress(progress)
        return await self._transition(
            task_id,
            "update progress",
            "UPDATE tasks SET stage = ?, progress = MAX(progress, ?), updated_at = ?"
            " WHERE id = ? AND state = 'processing' RETURNING *",
            (Stage(stage).value, progress, self._clock(), task_id),
        )

    async def complete(self, task_id: str, result: TaskResult) -> Task:
        now = self._clock()
        return await self._transition(
            task_id,
            "complete",
            "UPDATE tasks SET state = 'completed', progress = 100, result = ?, updated_at = ?,"
            " finished_at = ? WHERE id = ? AND state = 'processing' RETURNING *",
            (json.dumps(asdict(result), separators=(",", ":")), now, now, task_id),
        )

    async def fail(self, task_id: str, code: ErrorCode, message: str) -> Task:
        now = self._clock()
        return await self._transition(
            task_id,
            "fail",
            "UPDATE tasks SET state = 'failed', error_code = ?, error_message = ?, updated_at = ?,"
            " finished_at = ? WHERE id = ? AND state IN ('queued', 'processing') RETURNING *",
            (ErrorCode(code).value, message, now, now, task_id),
        )

    async def link_payment(self, task_id: str, payment_ref: str) -> Task:
        # Idempotent for the same reference; a task never changes which payment it belongs to.
        return await self._transition(
            task_id,
            "link a different payment",
            "UPDATE tasks SET payment_ref = ?, updated_at = ? WHERE id = ?"
            " AND (payment_ref IS NULL OR payment_ref = ?) RETURNING *",
            (payment_ref, self._clock(), task_id, payment_ref),
        )

    async def list_unfinished(self) -> list[Task]:
        rows = await self._db.execute_fetchall(
            "SELECT * FROM tasks WHERE state IN ('queued', 'processing') ORDER BY created_at, id"
        )
        return [_row_to_task(r) for r in rows]

    async def list_failed_since(self, since: float) -> list[Task]:
        rows = await self._db.execute_fetchall(
            "SELECT * FROM tasks WHERE state = 'failed' AND finished_at >= ? ORDER BY finished_at",
            (since,),
        )
        return [_row_to_task(r) for r in rows]

    async def _transition(
        self, task_id: str, action: str, sql: str, params: tuple[Any, ...]
    ) -> Task:
        rows = await self._db.execute_fetchall(sql, params)
        for row in rows:
            return _row_to_task(row)
        current = await self.get(task_id)
        if current is None:
            raise TaskNotFound(task_id)
        raise InvalidTransition(task_id, current.state.value, action)


def _check_progress(progress: int) -> None:
    if isinstance(progress, bool) or not isinstance(progress, int):
        raise TypeError("progress must be an int")
    if not 0 <= progress <= 100:
        raise ValueError(f"progress {progress} outside 0..100")


def _row_to_task(row: sqlite3.Row) -> Task:
    result_json = row["result"]
    result = TaskResult(**json.loads(result_json)) if result_json else None
    request = GenerationRequest(
        prompt=row["prompt"],
        model=row["model"],
        duration=int(row["duration"]),
        image=bytes(row["image"]) if row["image"] is not None else None,
        auto_enhance=bool(row["auto_enhance"]),
        template_data=json.loads(row["template_data"]),
    )
    return Task(
        id=row["id"],
        state=TaskState(row["state"]),
        request=request,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        stage=Stage(row["stage"]) if row["stage"] else None,
        progress=int(row["progress"]),
        attempts=int(row["attempts"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error_code=ErrorCode(row["error_code"]) if row["error_code"] else None,
        error_message=row["error_message"],
        result=result,
        payment_ref=row["payment_ref"],
        webhook_url=row["webhook_url"],
    )

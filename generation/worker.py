"""In-process workers: a queue, bounded concurrency, timeouts, outcome listeners and live progress.

The store is the truth; the pool only moves tasks through it. Consequences worth knowing:
- `stop()` cancels running renders and leaves their tasks `processing` on purpose, so the next
  `recover()` (run by `start()`) sees them and renders them again from scratch (renders are
  deterministic). A task interrupted `max_attempts` times fails as `interrupted` instead of
  looping forever; nothing stays `processing` across restarts.
- Progress reports are coalesced: if a backend reports faster than the store writes, only the
  latest value is written. Subscribers (SSE) are woken by the write itself, per task; nobody polls.
- Listeners get every terminal task exactly once per pool; async listeners run as background tasks
  so a slow refund never holds a worker slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path

from generation.backends.base import Backend, RenderResult
from generation.errors import BackendError, InvalidTransition, TaskNotFound
from generation.media import MediaStore
from generation.models import ErrorCode, GenerationRequest, Stage, Task, TaskResult, TaskState
from generation.store import TaskStore

__all__ = ["Listener", "WorkerPool"]

log = logging.getLogger(__name__)

Listener = Callable[[Task], Awaitable[None] | None]


def _no_checkpoint(name: str) -> None:
    """Fault-injection hook (tests kill the process at named steps); a no-op in production."""


_STATE_RANK = {
    TaskState.QUEUED: 0,
    TaskState.PROCESSING: 1,
    TaskState.COMPLETED: 2,
    TaskState.FAILED: 2,
}


class WorkerPool:
    def __init__(
        self,
        store: TaskStore,
        backend: Backend,
        media: MediaStore,
        *,
        concurrency: int = 2,
        task_timeout: float = 300.0,
        max_attempts: int = 3,
        listener_grace: float = 30.0,
        checkpoint: Callable[[str], None] = _no_checkpoint,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._store = store
        self._backend = backend
        self._media = media
        self._concurrency = concurrency
        self._task_timeout = task_timeout
        self._max_attempts = max_attempts
        self._listener_grace = listener_grace
        self._checkpoint = checkpoint
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._pending: set[str] = set()  # submitted to this pool and not finished
        self._consumers: list[asyncio.Task[None]] = []
        self._listeners: list[Listener] = []
        self._listener_tasks: set[asyncio.Task[None]] = set()
        self._channels: dict[str, _Channel] = {}
        self._stopped = False

    @property
    def store(self) -> TaskStore:
        return self._store

    @property
    def backlog(self) -> int:
        """Tasks submitted to this pool and not yet finished (queued or running)."""
        return len(self._pending)

    def add_listener(self, listener: Listener) -> None:
        """Called with the task snapshot each time a task completes or fails."""
        self._listeners.append(listener)

    async def start(self, *, recover: bool = True) -> None:
        if self._consumers:
            raise RuntimeError("WorkerPool already started")
        self._stopped = False
        self._consumers = [
            asyncio.create_task(self._consume(), name=f"generation-worker-{i}")
            for i in range(self._concurrency)
        ]
        if recover:
            await self.recover()

    async def stop(self) -> None:
        """Cancel running renders (their tasks stay `processing` for recovery) and end streams."""
        self._stopped = True
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            consumer.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
        self._pending.clear()
        while not self._queue.empty():
            self._queue.get_nowait()
        for channel in self._channels.values():
            channel.close()
        if self._listener_tasks:
            # Listeners may be moving money (refunds): give them time rather than cutting them off.
            _, late = await asyncio.wait(self._listener_tasks, timeout=self._listener_grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def create(
        self,
        request: GenerationRequest,
        *,
        webhook_url: str | None = None,
        payment_ref: str | None = None,
    ) -> Task:
        """Store a new task and queue it."""
        task = await self._store.create(request, webhook_url=webhook_url, payment_ref=payment_ref)
        self.submit(task.id)
        return task

    def submit(self, task_id: str) -> None:
        if task_id in self._pending:
            return
        self._pending.add(task_id)
        self._queue.put_nowait(task_id)

    async def recover(self) -> int:
        """Queue every unfinished task again; returns how many were queued."""
        queued = 0
        for task in await self._store.list_unfinished():
            if task.state is TaskState.PROCESSING and task.attempts >= self._max_attempts:
                try:
                    failed = await self._store.fail(
                        task.id,
                        ErrorCode.INTERRUPTED,
                        f"interrupted {task.attempts} times while processing",
                    )
                except InvalidTransition:
                    continue
                self._finish(failed)
                continue
            self.submit(task.id)
            queued += 1
        return queued

    async def subscribe(self, task_id: str) -> AsyncGenerator[Task, None]:
        """Snapshots of one task, each time its state, stage or progress changes, until terminal.

        Starts with the stored snapshot (TaskNotFound if there is none). Slow consumers skip
        intermediate values rather than queueing them. Use it inside `contextlib.aclosing`.
        """
        channel = self._channels.get(task_id)
        if channel is None:
            channel = self._channels[task_id] = _Channel()
        channel.refs += 1
        try:
            version = channel.version
            current = await self._store.get(task_id)
            if current is None:
                raise TaskNotFound(task_id)
            last: tuple[TaskState, Stage | None, int] | None = None
            while True:
                if channel.version != version and channel.task is not None:
                    version = channel.version
                    current = _fresher(current, channel.task)
                key = (current.state, current.stage, current.progress)
                if key != last:
                    last = key
                    yield current
                if current.terminal or channel.closed or self._stopped:
                    return
                await channel.wait_past(version)
        finally:
            channel.refs -= 1
            if channel.refs == 0 and self._channels.get(task_id) is channel:
                del self._channels[task_id]

    def _publish(self, task: Task) -> None:
        channel = self._channels.get(task.id)
        if channel is not None:
            channel.publish(task)

    def _finish(self, task: Task) -> None:
        self._publish(task)
        for listener in self._listeners:
            try:
                outcome = listener(task)
            except Exception:
                log.exception("task listener failed for task %s", task.id)
                continue
            if inspect.isawaitable(outcome):
                job = asyncio.ensure_future(outcome)
                self._listener_tasks.add(job)
                job.add_done_callback(self._listener_done)

    def _listener_done(self, job: asyncio.Future[None]) -> None:
        self._listener_tasks.discard(job)
        if not job.cancelled() and job.exception() is not None:
            log.error("task listener failed", exc_info=job.exception())

    async def _consume(self) -> None:
        while True:
            task_id = await self._queue.get()
            try:
                await self._run(task_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The store write failed: the task stays where it was and recovery retries it.
                log.exception("worker could not record the outcome of task %s", task_id)
            finally:
                self._pending.discard(task_id)

    async def _run(self, task_id: str) -> None:
        try:
            task = await self._store.start(task_id)
        except (InvalidTransition, TaskNotFound) as exc:
            log.info("skipping task %s: %s", task_id, exc)
            return
        self._publish(task)
        sink = _ProgressSink(self._store, task_id, self._publish)
        try:
            out_dir = self._media.task_dir(task_id)
            self._checkpoint("mid_render")
            async with asyncio.timeout(self._task_timeout):
                rendered = await self._backend.render(task.request, out_dir, sink.report)
        except asyncio.CancelledError:
            sink.abort()
            raise
        except TimeoutError:
            await self._fail(
                sink, task_id, ErrorCode.TIMEOUT, f"rendering exceeded {self._task_timeout:g} s"
            )
            return
        except BackendError as exc:
            await self._fail(sink, task_id, exc.code, exc.message)
            return
        except Exception:
            log.exception("backend crashed on task %s", task_id)
            await self._fail(sink, task_id, ErrorCode.INTERNAL, "internal error")
            return
        await sink.close()
        done = await self._store.complete(task_id, self._result(rendered))
        self._finish(done)

    async def _fail(self, sink: _ProgressSink, task_id: str, code: ErrorCode, message: str) -> None:
        await sink.close()
        failed = await self._store.fail(task_id, code, message)
        with contextlib.suppress(ValueError, OSError):  # partial output only; prune catches strays
            await asyncio.to_thread(self._media.remove, task_id)
        self._finish(failed)

    def _result(self, rendered: RenderResult) -> TaskResult:
        return TaskResult(
            text=rendered.text,
            video_path=self._media.relative(Path(rendered.video)),
            image_path=self._media.relative(Path(rendered.preview)),
            template_name=rendered.template_name,
            width=rendered.width,
            height=rendered.height,
            duration=rendered.duration,
        )


def _fresher(a: Task, b: Task) -> Task:
    rank_a = (_STATE_RANK[a.state], a.progress, a.updated_at)
    rank_b = (_STATE_RANK[b.state], b.progress, b.updated_at)
    return b if rank_b >= rank_a else a


class _Channel:
    """Latest snapshot of one task plus a wake-up for its subscribers."""

    def __init__(self) -> None:
        self.task: Task | None = None
        self.version = 0
        self.refs = 0
        self.closed = False
        self._changed = asyncio.Event()

    def publish(self, task: Task) -> None:
        self.task = task
        self.version += 1
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_past(self, version: int) -> None:
        while self.version == version and not self.closed:
            await self._changed.wait()


class _ProgressSink:
    """Takes reports on the loop thread and writes the latest one; never blocks the backend."""

    def __init__(self, store: TaskStore, task_id: str, publish: Callable[[Task], None]) -> None:
        self._store = store
        self._task_id = task_id
        self._publish = publish
        self._pending: tuple[Stage, int] | None = None
        self._wake = asyncio.Event()
        self._closed = False
        self._writer = asyncio.create_task(self._write())

    def report(self, stage: Stage, progress: int) -> None:
        if self._closed:
            return
        # 100 is reserved for `completed`; the store keeps the maximum anyway.
        value = min(99, max(0, int(progress)))
        if self._pending is not None:
            value = max(value, self._pending[1])
        self._pending = (Stage(stage), value)
        self._wake.set()

    async def close(self) -> None:
        """Write what is pending, then stop."""
        self._closed = True
        self._wake.set()
        await self._writer

    def abort(self) -> None:
        self._closed = True
        self._writer.cancel()

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            item, self._pending = self._pending, None
            if item is not None:
                try:
                    task = await self._store.update_progress(self._task_id, *item)
                except (InvalidTransition, TaskNotFound):
                    return
                except Exception:
                    log.exception("could not record progress of task %s", self._task_id)
                else:
                    self._publish(task)
            if self._closed and self._pending is None:
                return

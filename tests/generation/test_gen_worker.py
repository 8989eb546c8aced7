"""WorkerPool with the real renderer and a real SQLite file: progress, outcomes, restarts."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import av
import pytest

from generation.backends.local import LocalBackend, LocalSettings
from generation.errors import TaskNotFound
from generation.media import MediaStore
from generation.models import ErrorCode, GenerationRequest, Stage, Task, TaskState
from generation.store import SqliteTaskStore
from generation.worker import WorkerPool


async def _collect(pool: WorkerPool, task_id: str) -> list[Task]:
    seen: list[Task] = []
    async with asyncio.timeout(30):
        async with contextlib.aclosing(pool.subscribe(task_id)) as events:
            async for snapshot in events:
                seen.append(snapshot)
    return seen


class Outcomes:
    """A listener recording terminal tasks; async, like the gateway's refund listener."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []
        self.event = asyncio.Event()

    async def __call__(self, task: Task) -> None:
        await asyncio.sleep(0)
        self.tasks.append(task)
        self.event.set()


async def test_task_completes_with_rising_progress_seen_by_subscriber(
    store: SqliteTaskStore, media: MediaStore, small_backend: LocalBackend
) -> None:
    pool = WorkerPool(store, small_backend, media, concurrency=2)
    outcomes = Outcomes()
    pool.add_listener(outcomes)
    sync_seen: list[str] = []
    pool.add_listener(lambda t: sync_seen.append(t.id))  # plain callables work too
    await pool.start()
    try:
        task = await pool.create(
            GenerationRequest(prompt="fireflies in a jar", model="local", duration=3),
            webhook_url="https://example.com/h",
        )
        seen = await _collect(pool, task.id)
    finally:
        await pool.stop()

    assert seen[-1].state is TaskState.COMPLETED and seen[-1].progress == 100
    processing = [s.progress for s in seen if s.state is TaskState.PROCESSING]
    assert len(set(processing)) >= 4, processing
    progress = [s.progress for s in seen]
    assert progress == sorted(progress)
    assert {s.stage for s in seen} >= {Stage.PLANNING, Stage.RENDERING}

    done = await store.get(task.id)
    assert done is not None and done.result is not None
    video = media.resolve(done.result.video_path)
    assert video is not None and media.resolve(done.result.image_path) is not None
    assert media.url(done.result.video_path) == f"http://127.0.0.1:9/media/{task.id}/video.mp4"
    with av.open(str(video)) as box:
        assert box.duration is not None
        assert float(box.duration) / 1e6 == pytest.approx(3.0, abs=1 / 24)
    assert [t.id for t in outcomes.tasks] == [task.id] and sync_seen == [task.id]
    assert outcomes.tasks[0].state is TaskState.COMPLETED


async def test_timeout_fails_the_task_and_tells_listeners(
    store: SqliteTaskStore, media: MediaStore, small_backend: LocalBackend
) -> None:
    pool = WorkerPool(store, small_backend, media, task_timeout=0.4)
    outcomes = Outcomes()
    pool.add_listener(outcomes)
    await pool.start()
    try:
        task = await pool.create(GenerationRequest(prompt="slow", model="local", duration=60))
        async with asyncio.timeout(10):
            await outcomes.event.wait()
    finally:
        await pool.stop()
    failed = outcomes.tasks[0]
    assert failed.id == task.id and failed.state is TaskState.FAILED
    assert failed.error_code is ErrorCode.TIMEOUT
    assert (await store.get(task.id)) == failed
    assert not media.task_dir(task.id, create=False).exists()  # partial output removed


async def test_backend_error_becomes_failed_with_its_code(
    store: SqliteTaskStore, media: MediaStore, small_backend: LocalBackend
) -> None:
    pool = WorkerPool(store, small_backend, media)
    outcomes = Outcomes()
    pool.add_listener(outcomes)
    await pool.start()
    try:
        bad = await pool.create(
            GenerationRequest(prompt="x", model="local", duration=1, image=b"not an image")
        )
        seen = await _collect(pool, bad.id)
    finally:
        await pool.stop()
    assert seen[-1].state is TaskState.FAILED
    assert seen[-1].error_code is ErrorCode.INVALID_INPUT
    assert seen[-1].error_message == "image could not be decoded"
    assert [t.error_code for t in outcomes.tasks] == [ErrorCode.INVALID_INPUT]


async def test_concurrency_is_bounded(
    store: SqliteTaskStore, media: MediaStore, small_backend: LocalBackend
) -> None:
    pool = WorkerPool(store, small_backend, media, concurrency=1)
    await pool.start()
    try:
        a = await pool.create(GenerationRequest(prompt="one", model="local", duration=1))
        b = await pool.create(GenerationRequest(prompt="two", model="local", duration=1))
        await _collect(pool, b.id)
    finally:
        await pool.stop()
    ta, tb = await store.get(a.id), await store.get(b.id)
    assert ta is not None and tb is not None
    assert ta.state is tb.state is TaskState.COMPLETED
    assert ta.finished_at is not None and tb.started_at is not None
    assert tb.started_at >= ta.finished_at  # the second waited for the only slot


async def test_restart_rerenders_a_task_left_processing(tmp_path: Path, media: MediaStore) -> None:
    db = tmp_path / "tasks.db"
    # A slow-enough render (many frames) so the stop lands mid-render.
    backend = LocalBackend(LocalSettings(width=160, height=90, fps=24))
    store1 = await SqliteTaskStore(db).open()
    pool1 = WorkerPool(store1, backend, media)
    await pool1.start()
    task = await pool1.create(GenerationRequest(prompt="crash test", model="local", duration=20))
    async with asyncio.timeout(15), contextlib.aclosing(pool1.subscribe(task.id)) as events:
        async for snap in events:
            if snap.stage is Stage.RENDERING and snap.progress >= 20:
                break
    await pool1.stop()  # as at shutdown: the running render is cancelled, the task stays processing
    left = await store1.get(task.id)
    await store1.close()
    assert left is not None and left.state is TaskState.PROCESSING and left.attempts == 1
    assert left.progress >= 20

    store2 = await SqliteTaskStore(db).open()
    pool2 = WorkerPool(store2, backend, media)
    outcomes = Outcomes()
    pool2.add_listener(outcomes)
    try:
        await pool2.start()  # recover() runs here
        seen = await _collect(pool2, task.id)
    finally:
        await pool2.stop()
        await store2.close()
    progress = [s.progress for s in seen]
    assert progress == sorted(progress) and progress[0] >= left.progress  # never went backwards
    final = seen[-1]
    assert final.state is TaskState.COMPLETED and final.attempts == 2
    assert final.result is not None and final.result.duration == pytest.approx(20.0, abs=1 / 24)
    assert [t.id for t in outcomes.tasks] == [task.id]


async def test_recovery_requeues_queued_and_gives_up_on_repeat_crashes(
    store: SqliteTaskStore, media: MediaStore, small_backend: LocalBackend
) -> None:
    queued = await store.create(GenerationRequest(prompt="waiting", model="local", duration=1))
    crashy = await store.create(GenerationRequest(prompt="crashy", model="local", duration=1))
    for _ in range(3):
        await store.start(crashy.id)  # three starts that never finished
    pool = WorkerPool(store, small_backend, media, max_attempts=3)
    outcomes = Outcomes()
    pool.add_listener(outcomes)
    try:
        await pool.start()
        seen = await _collect(pool, queued.id)
        async with asyncio.timeout(5):
            while len(outcomes.tasks) < 2:
                outcomes.event.clear()
                await outcomes.event.wait()
    finally:
        await pool.stop()
    assert seen[-1].state is TaskState.COMPLETED
    gave_up = await store.get(crashy.id)
    assert gave_up is not None and gave_up.state is TaskState.FAILED
    assert gave_up.error_code is ErrorCode.INTERRUPTED
    assert {t.id for t in outcomes.tasks} == {queued.id, crashy.id}
    assert await store.list_unfinished() == []


async def test_subscribe_unknown_task_and_terminal_task(
    store: SqliteTaskStore, media: MediaStore, small_backend: LocalBackend
) -> None:
    pool = WorkerPool(store, small_backend, media)
    with pytest.raises(TaskNotFound):
        await _collect(pool, "missing")
    task = await store.create(GenerationRequest(prompt="x", model="local", duration=1))
    await store.fail(task.id, ErrorCode.INTERNAL, "gone")
    seen = await _collect(pool, task.id)
    assert [s.state for s in seen] == [TaskState.FAILED]
    assert pool._channels == {}  # subscriptions clean up after themselves

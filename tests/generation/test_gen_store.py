"""SqliteTaskStore: lifecycle rules, monotonic progress, durability across reopen."""

from __future__ import annotations

from pathlib import Path

import pytest

from generation.errors import InvalidTransition, TaskExists, TaskNotFound
from generation.models import ErrorCode, GenerationRequest, Stage, TaskResult, TaskState
from generation.store import SqliteTaskStore

REQUEST = GenerationRequest(
    prompt="a red kite over hills",
    model="local",
    duration=4,
    image=b"\x00\x01binary\xff",
    auto_enhance=True,
    template_data={"title": "Kite", "n": 3, "nested": {"a": [1, 2]}},
)
RESULT = TaskResult(
    text="t",
    video_path="abc/video.mp4",
    image_path="abc/preview.jpg",
    template_name="aurora",
    width=854,
    height=480,
    duration=4.0,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


async def test_create_and_get_round_trip(tmp_path: Path) -> None:
    clock = FakeClock()
    async with SqliteTaskStore(tmp_path / "t.db", clock=clock, id_factory=lambda: "task1") as store:
        task = await store.create(REQUEST, webhook_url="https://example.com/hook", payment_ref="p9")
        assert task.id == "task1"
        assert task.state is TaskState.QUEUED
        assert task.progress == 0 and task.stage is None and task.attempts == 0
        assert task.created_at == task.updated_at == 1_700_000_001.0
        got = await store.get("task1")
        assert got == task
        assert got is not None and got.request == REQUEST
        assert await store.get("nope") is None


async def test_lifecycle_and_monotonic_progress(store: SqliteTaskStore) -> None:
    task = await store.create(REQUEST)
    with pytest.raises(InvalidTransition):
        await store.update_progress(task.id, Stage.RENDERING, 10)  # not processing yet
    with pytest.raises(InvalidTransition):
        await store.complete(task.id, RESULT)

    started = await store.start(task.id)
    assert started.state is TaskState.PROCESSING
    assert started.stage is Stage.PLANNING and started.attempts == 1
    assert started.started_at is not None

    t = await store.update_progress(task.id, Stage.RENDERING, 40)
    assert (t.stage, t.progress) == (Stage.RENDERING, 40)
    t = await store.update_progress(task.id, Stage.ENCODING, 20)  # lower value: the higher stays
    assert (t.stage, t.progress) == (Stage.ENCODING, 40)
    with pytest.raises(ValueError):
        await store.update_progress(task.id, Stage.ENCODING, 101)

    # A restart keeps the progress already shown to clients.
    restarted = await store.start(task.id)
    assert restarted.attempts == 2 and restarted.progress == 40

    done = await store.complete(task.id, RESULT)
    assert done.state is TaskState.COMPLETED and done.progress == 100
    assert done.result == RESULT and done.finished_at is not None
    for action in (
        store.start(task.id),
        store.update_progress(task.id, Stage.FINALIZING, 100),
        store.complete(task.id, RESULT),
        store.fail(task.id, ErrorCode.INTERNAL, "late"),
    ):
        with pytest.raises(InvalidTransition):
            await action
    assert (await store.get(task.id)) == done


async def test_fail_from_queued_and_processing(store: SqliteTaskStore) -> None:
    queued = await store.create(REQUEST)
    failed = await store.fail(queued.id, ErrorCode.INVALID_INPUT, "bad image")
    assert failed.state is TaskState.FAILED
    assert (failed.error_code, failed.error_message) == (ErrorCode.INVALID_INPUT, "bad image")

    running = await store.create(REQUEST)
    await store.start(running.id)
    await store.update_progress(running.id, Stage.RENDERING, 55)
    failed = await store.fail(running.id, ErrorCode.TIMEOUT, "too slow")
    assert failed.progress == 55 and failed.error_code is ErrorCode.TIMEOUT

    with pytest.raises(TaskNotFound):
        await store.start("missing")
    with pytest.raises(TaskNotFound):
        await store.fail("missing", ErrorCode.INTERNAL, "x")


async def test_link_payment_is_idempotent_but_never_relinks(store: SqliteTaskStore) -> None:
    task = await store.create(REQUEST)
    linked = await store.link_payment(task.id, "pay-1")
    assert linked.payment_ref == "pay-1"
    assert (await store.link_payment(task.id, "pay-1")).payment_ref == "pay-1"
    with pytest.raises(InvalidTransition):
        await store.link_payment(task.id, "pay-2")
    with pytest.raises(TaskNotFound):
        await store.link_payment("missing", "pay-1")


async def test_unfinished_tasks_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    clock = FakeClock()
    async with SqliteTaskStore(path, clock=clock) as store:
        a = await store.create(REQUEST)
        b = await store.create(REQUEST)
        c = await store.create(REQUEST)
        await store.start(b.id)
        await store.update_progress(b.id, Stage.RENDERING, 30)
        await store.start(c.id)
        await store.complete(c.id, RESULT)
    async with SqliteTaskStore(path, clock=clock) as store:
        unfinished = await store.list_unfinished()
        assert [t.id for t in unfinished] == [a.id, b.id]
        assert [t.state for t in unfinished] == [TaskState.QUEUED, TaskState.PROCESSING]
        assert unfinished[1].progress == 30
        assert (await store.get(c.id)).state is TaskState.COMPLETED  # type: ignore[union-attr]


async def test_a_chosen_task_id_is_taken_once(tmp_path: Path) -> None:
    async with SqliteTaskStore(tmp_path / "t.db") as store:
        request = GenerationRequest(prompt="p", model="local", duration=1)
        first = await store.create(request, task_id="pay-1", payment_ref="pay-1")
        with pytest.raises(TaskExists):
            await store.create(request, task_id="pay-1", payment_ref="pay-1")
        assert (await store.get("pay-1")) == first

"""A local stand-in for a hosted video provider, speaking the OpenAI videos API for real over HTTP.

The hosted provider cannot run here (no outside network, no keys), so this Starlette app implements
the API the upstream backend talks to — `POST /v1/videos` (JSON or multipart with
`input_reference`), `GET /v1/videos/{id}` with `status`/`progress`/`error`, and
`GET /v1/videos/{id}/content` — and renders with our own embedded renderer behind it, at the
requested `size`. A prompt containing `[fail]` makes the job fail the way a provider reports it.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from generation.backends.local import LocalBackend, LocalSettings
from generation.errors import BackendError
from generation.models import GenerationRequest, Stage

_SIZE = re.compile(r"(\d{2,4})x(\d{2,4})")


@dataclass
class Job:
    id: str
    model: str
    prompt: str
    seconds: str
    size: str
    created_at: int
    image: bytes | None
    status: str = "queued"
    progress: int = 0
    error: dict[str, str] | None = None
    completed_at: int | None = None
    path: Path | None = None
    stages: list[str] = field(default_factory=list)
    unseen: list[int] = field(default_factory=list)  # progress values no poll has reported yet

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "video",
            "model": self.model,
            "status": self.status,
            "progress": self.progress,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "expires_at": None,
            "prompt": self.prompt,
            "size": self.size,
            "seconds": self.seconds,
            "remixed_from_video_id": None,
            "error": self.error,
        }


class FakeVideosAPI:
    """`report_every_step`: each status poll reports the next progress value the render made,
    and `completed` only once all were reported (a slow provider's view, whatever the CPU load:
    tests of progress mapping then do not depend on how fast the render ran)."""

    def __init__(self, root: Path, api_key: str, *, report_every_step: bool = False) -> None:
        self.root = root
        self.api_key = api_key
        self.report_every_step = report_every_step
        self.jobs: dict[str, Job] = {}
        self.seen_auth: list[str] = []
        self.content_downloads = 0
        self._renders: set[asyncio.Task[None]] = set()
        self.app = Starlette(
            routes=[
                Route("/v1/videos", self.create, methods=["POST"]),
                Route("/v1/videos/{video_id}", self.retrieve, methods=["GET"]),
                Route("/v1/videos/{video_id}/content", self.content, methods=["GET"]),
            ]
        )

    def _authorized(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        self.seen_auth.append(auth)
        return auth == f"Bearer {self.api_key}"

    @staticmethod
    def _error(status: int, message: str, kind: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)

    async def create(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided", "invalid_request_error")
        image: bytes | None = None
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            fields, files = _parse_multipart(content_type, await request.body())
            image = files.get("input_reference")
        else:
            fields = await request.json()
        size = str(fields.get("size", "1280x720"))
        seconds = str(fields.get("seconds", "4"))
        match = _SIZE.fullmatch(size)
        if not match or not seconds.isdigit() or not 1 <= int(seconds) <= 20:
            return self._error(400, "invalid size or seconds", "invalid_request_error")
        job = Job(
            id=f"video_{uuid.uuid4().hex}",
            model=str(fields.get("model", "sora-2")),
            prompt=str(fields.get("prompt", "")),
            seconds=seconds,
            size=size,
            created_at=int(time.time()),
            image=image,
        )
        self.jobs[job.id] = job
        render = asyncio.create_task(self._render(job, int(match[1]), int(match[2])))
        self._renders.add(render)
        render.add_done_callback(self._renders.discard)
        return JSONResponse(job.public())

    async def _render(self, job: Job, width: int, height: int) -> None:
        await asyncio.sleep(0.05)  # sit in `queued` briefly, as a provider's queue would

        def progress(stage: Stage, value: int) -> None:
            job.status = "in_progress"
            job.stages.append(stage.value)
            job.progress = max(job.progress, value)
            if self.report_every_step and (not job.unseen or job.unseen[-1] < job.progress):
                job.unseen.append(job.progress)

        if "[fail]" in job.prompt:
            job.status = "in_progress"
            job.progress = 10
            await asyncio.sleep(0.1)
            job.status = "failed"
            job.error = {"code": "moderation_blocked", "message": "the prompt was rejected"}
            return
        backend = LocalBackend(LocalSettings(models=(job.model,), width=width, height=height))
        request = GenerationRequest(
            prompt=job.prompt, model=job.model, duration=int(job.seconds), image=job.image
        )
        try:
            result = await backend.render(request, self.root / job.id, progress)
        except BackendError as exc:
            job.status = "failed"
            job.error = {"code": "render_failed", "message": exc.message}
            return
        job.path = result.video
        job.progress = 100
        job.completed_at = int(time.time())
        job.status = "completed"

    async def retrieve(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided", "invalid_request_error")
        job = self.jobs.get(request.path_params["video_id"])
        if job is None:
            return self._error(404, "video not found", "invalid_request_error")
        if job.unseen:
            return JSONResponse(
                {**job.public(), "status": "in_progress", "progress": job.unseen.pop(0)}
            )
        return JSONResponse(job.public())

    async def content(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._error(401, "Incorrect API key provided", "invalid_request_error")
        job = self.jobs.get(request.path_params["video_id"])
        if job is None or job.status != "completed" or job.path is None:
            return self._error(404, "video content not ready", "invalid_request_error")
        self.content_downloads += 1
        return FileResponse(job.path, media_type="video/mp4")


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """multipart/form-data via the stdlib MIME parser (python-multipart is not a dependency)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(payload, bytes):
            continue
        if part.get_filename() is not None:
            files[name] = payload
        else:
            fields[name] = payload.decode()
    return fields, files

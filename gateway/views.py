"""The public JSON shape of a task (status route, SSE events, webhooks).

Never includes keys, signatures or payment headers: only the tx hashes, amounts and payer
address that anyone can already read on chain.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from generation import Task, TaskState
from payments.ledger import PaymentState, UnknownPayment

if TYPE_CHECKING:
    from gateway.services import Services

__all__ = ["STATUS_CODES", "task_view"]

STATUS_CODES = {
    TaskState.QUEUED: 202,
    TaskState.PROCESSING: 202,
    TaskState.COMPLETED: 200,
    TaskState.FAILED: 500,
}


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


async def task_view(services: Services, task: Task) -> dict[str, Any]:
    view: dict[str, Any] = {
        "taskId": task.id,
        "status": task.state.value,
        "stage": task.stage.value if task.stage else None,
        "progress": task.progress,
        "createdAt": _iso(task.created_at),
        "updatedAt": _iso(task.updated_at),
        "finishedAt": _iso(task.finished_at),
    }
    if task.result is not None:
        media = services.media
        view["result"] = {
            "generation": {
                "text": task.result.text,
                "image": media.url(task.result.image_path),
                "video": {
                    "url": media.url(task.result.video_path),
                    "width": task.result.width,
                    "height": task.result.height,
                    "duration": task.result.duration,
                },
                "templateName": task.result.template_name,
            },
            "templateData": dict(task.request.template_data),
        }
    if task.state is TaskState.FAILED:
        view["error"] = {
            "code": task.error_code.value if task.error_code else "internal",
            "message": task.error_message or "",
        }
    if task.payment_ref is not None:
        try:
            record = await services.ledger.get(task.payment_ref)
        except UnknownPayment:
            record = None
        if record is not None:
            view["payment"] = {
                "transaction": record.tx_hash,
                "amount": str(record.amount),
                "payer": record.payer,
                "network": record.network,
            }
            if record.state in (PaymentState.REFUND_SUBMITTED, PaymentState.REFUNDED):
                view["refund"] = {
                    "transaction": record.refund_tx,
                    "amount": str(record.amount),
                    "status": "confirmed" if record.state is PaymentState.REFUNDED else "pending",
                }
            elif task.state is TaskState.FAILED:
                view["refund"] = {
                    "transaction": None,
                    "amount": str(record.amount),
                    "status": "pending",
                }
    return view

"""The OpenAPI 3.1 description of the gateway's HTTP API (served at `/openapi.json`)."""

from __future__ import annotations

from typing import Any

from gateway.pricing import PriceBook
from gateway.quoting import OUTPUT_SCHEMA, input_schema

__all__ = ["openapi_document"]

_TASK_VIEW: dict[str, Any] = {
    "type": "object",
    "required": ["taskId", "status"],
    "properties": {
        "taskId": {"type": "string"},
        "status": {"type": "string", "enum": ["queued", "processing", "completed", "failed"]},
        "stage": {"type": ["string", "null"]},
        "progress": {"type": "integer", "minimum": 0, "maximum": 100},
        "result": {"type": "object"},
        "error": {"type": "object"},
        "payment": {"type": "object"},
        "refund": {"type": "object"},
    },
}
_PROBLEM: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string"},
        "message": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object"}},
    },
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def openapi_document(prices: PriceBook) -> dict[str, Any]:
    task_id = {"name": "task_id", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "x402-gateway",
            "version": "0.1.0",
            "description": "Pay-per-request video generation, paid in USDC over x402 (HTTP 402).",
        },
        "paths": {
            "/generation/create": {
                "post": {
                    "summary": "Create a generation task (paid: answer the 402 with a payment)",
                    "parameters": [
                        {"name": "PAYMENT-SIGNATURE", "in": "header", "schema": {"type": "string"}},
                        {"name": "X-PAYMENT", "in": "header", "schema": {"type": "string"}},
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": input_schema(prices)}},
                    },
                    "responses": {
                        "202": _json(OUTPUT_SCHEMA, "paid and accepted"),
                        "400": _json(_PROBLEM, "invalid body or unsupported option"),
                        "402": _json({"type": "object"}, "payment required (x402 v1 body)"),
                        "413": _json(_PROBLEM, "body too large"),
                        "503": _json(_PROBLEM, "chain or database unavailable; retry"),
                    },
                }
            },
            "/generation/{task_id}/status": {
                "get": {
                    "summary": "Task status",
                    "parameters": [task_id],
                    "responses": {
                        "200": _json(_TASK_VIEW, "completed"),
                        "202": _json(_TASK_VIEW, "queued or processing"),
                        "404": _json(_TASK_VIEW, "not found"),
                        "500": _json(_TASK_VIEW, "failed (the payment is refunded)"),
                    },
                }
            },
            "/generation/{task_id}/events": {
                "get": {
                    "summary": "Server-Sent Events of status changes until a terminal state",
                    "parameters": [task_id],
                    "responses": {
                        "200": {
                            "description": "event stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        "404": _json(_TASK_VIEW, "not found"),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "responses": {"200": _json({"type": "object"}, "ok")},
                }
            },
        },
    }

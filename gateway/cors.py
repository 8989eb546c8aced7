"""CORS only where a browser asks for it: requests without an `Origin` header (agents, scripts,
servers) skip Starlette's `CORSMiddleware`, which otherwise wraps every response's `send`."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["ALLOWED_HEADERS", "EXPOSED_HEADERS", "OriginOnlyCORS"]

# A browser client must be able to send the payment and read the challenge and the receipt.
EXPOSED_HEADERS = ["PAYMENT-REQUIRED", "PAYMENT-RESPONSE", "X-PAYMENT-RESPONSE", "Location"]
ALLOWED_HEADERS = ["Content-Type", "PAYMENT-SIGNATURE", "X-PAYMENT", "Authorization"]


class OriginOnlyCORS:
    def __init__(
        self,
        app: ASGIApp,
        *,
        allow_origins: Sequence[str],
        allow_methods: Sequence[str],
        allow_headers: Sequence[str],
        expose_headers: Sequence[str],
    ) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=allow_origins,
            allow_methods=allow_methods,
            allow_headers=allow_headers,
            expose_headers=expose_headers,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and any(name == b"origin" for name, _ in scope["headers"]):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)

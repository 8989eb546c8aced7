"""Real servers for the payer tests, each wrapped in a `Recorder` that notes every request and
whether it carried a payment header (so a test can prove no signature ever left the client).

- our gateway (`create_app`) on the session's Anvil;
- the official x402 SDK's FastAPI middleware, with the official facilitator (`x402Facilitator`
  and its web3 signer) settling on the same Anvil.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send
from x402 import x402Facilitator, x402ResourceServer
from x402.http.middleware.fastapi import payment_middleware
from x402.http.types import PaymentOption, RouteConfig
from x402.mechanisms.evm.exact import register_exact_evm_facilitator, register_exact_evm_server
from x402.mechanisms.evm.signers import FacilitatorWeb3Signer

OFFICIAL_PRICE = 10_000  # "$0.01" in atomic USDC


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    payment_signature: str | None
    x_payment: str | None

    @property
    def paid(self) -> bool:
        return self.payment_signature is not None or self.x_payment is not None


@dataclass
class Recorder:
    """Pure ASGI wrapper that records each HTTP request before the app sees it."""

    app: ASGIApp
    requests: list[SeenRequest] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            self.requests.append(
                SeenRequest(
                    scope["method"],
                    scope["path"],
                    headers.get("payment-signature"),
                    headers.get("x-payment"),
                )
            )
        await self.app(scope, receive, send)

    def mark(self) -> int:
        return len(self.requests)

    def since(self, mark: int) -> list[SeenRequest]:
        return self.requests[mark:]


def official_app(rpc_url: str, facilitator_key: str, pay_to: str) -> FastAPI:
    """The official SDK's resource server selling `GET /weather` for $0.01 on eip155:8453."""
    signer = FacilitatorWeb3Signer(private_key=facilitator_key, rpc_url=rpc_url)
    facilitator = x402Facilitator()
    register_exact_evm_facilitator(facilitator, signer, networks="eip155:8453")
    server = x402ResourceServer(facilitator)
    register_exact_evm_server(server, "eip155:8453")
    routes: Any = {
        "GET /weather": RouteConfig(
            accepts=PaymentOption(
                scheme="exact", pay_to=pay_to, price="$0.01", network="eip155:8453"
            ),
            description="today's weather",
            mime_type="application/json",
        )
    }
    app = FastAPI()
    paywall = payment_middleware(routes, server)

    @app.middleware("http")
    async def x402(request: Any, call_next: Any) -> Any:
        return await paywall(request, call_next)

    @app.get("/weather")
    async def weather() -> dict[str, str]:
        return {"weather": "sunny", "temperature": "21C"}

    return app


_PAYMENT_HEADER = re.compile(rb"\r\n(payment-signature|x-payment): ([^\r\n]+)", re.IGNORECASE)


class CuttingProxy:
    """TCP proxy between a client and a server that drops the next ``drop`` responses carrying
    a settlement header: it closes both sockets instead of forwarding them (or, with
    ``keep_headers``, right after their headers). The server has done its work (settled,
    answered); the client only sees the connection die."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.drop = 0
        self.dropped = 0
        self.keep_headers = False  # forward the dropped answer's headers, cut before its body
        self.payment_headers: list[bytes] = []  # every payment header value that went upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stopped = True
        self._thread.join(timeout=5)
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream:
                    with self._lock:
                        self.payment_headers.extend(
                            m.group(2) for m in _PAYMENT_HEADER.finditer(data)
                        )
                elif b"payment-response:" in data.lower():
                    with self._lock:
                        cut = self.drop > 0
                        if cut:
                            self.drop -= 1
                            self.dropped += 1
                    if cut:
                        if self.keep_headers:
                            end = data.find(b"\r\n\r\n")
                            dst.sendall(data[: end + 4] if end >= 0 else data)
                        break  # lose the answer: close both ends
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

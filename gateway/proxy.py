"""`Forwarder`: the pure ASGI reverse proxy of proxy mode, and the payer headers it signs.

Request bodies are streamed up and responses streamed back (never buffered); hop-by-hop and
payment headers are dropped; `X-Forwarded-For/Proto/Host` are set. An upstream that cannot be
reached answers `502`, one that does not answer within `timeout_s` (per read) `504`; both are
>= 500, so the paywall refunds a paid request. Once the upstream has sent its status line, a
failure mid-body can only cut the stream.

On a paid request the upstream receives who paid, in headers it can trust only from us (every
client-sent `X-X402-*` header is dropped first):

    X-X402-Payer          0x... checksummed address
    X-X402-Transaction    settlement tx hash
    X-X402-Amount         atomic units (decimal string)
    X-X402-Network        CAIP-2 id, e.g. eip155:8453
    X-X402-Payment-Id     the gateway's payment id
    X-X402-Timestamp      unix seconds when the gateway forwarded the request
    X-X402-Signature      hex HMAC-SHA256 under the shared proxy secret of the lines
                          "x402-proxy-v1", timestamp, method, path, payer, transaction,
                          amount, network, payment id, joined by "\\n"

`path` is the request path as the upstream receives it (percent-encoded, without the query
string). The upstream recomputes the HMAC with the same secret, compares it in constant time
and refuses stale timestamps: `verify_payer_headers` does exactly that, with the standard library
only, so it can be copied into any Python upstream.
"""

from __future__ import annotations

import hashlib
import hmac
import http.cookiejar
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Final

import anyio
import httpx
from starlette.types import Message, Receive, Scope, Send

from gateway.errors import HTTPProblem, UpstreamTimeout, UpstreamUnreachable, problem_response
from gateway.middleware import PAID_STATE_KEY, PaidRequest

__all__ = [
    "PAYER_HEADERS",
    "Forwarder",
    "PayerHeaders",
    "new_upstream_client",
    "payer_headers",
    "sign_payer_headers",
    "verify_payer_headers",
]

log = logging.getLogger("x402.proxy")

SIGNATURE_VERSION: Final = "x402-proxy-v1"
PAYER_HEADERS: Final = (
    "x-x402-payer",
    "x-x402-transaction",
    "x-x402-amount",
    "x-x402-network",
    "x-x402-payment-id",
    "x-x402-timestamp",
    "x-x402-signature",
)
# RFC 9110 7.6.1 connection-specific fields, plus what a proxy must never pass on: the
# payment itself (the upstream gets the verified outcome instead) and `expect` (we read the body).
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
_REQUEST_DROP: Final = _HOP_BY_HOP | {b"host", b"expect", b"payment-signature", b"x-payment"}
_FORWARDED: Final = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
# The client must see OUR settlement header only; date/server are set by our own server.
_RESPONSE_DROP: Final = _HOP_BY_HOP | {
    b"payment-required",
    b"payment-response",
    b"x-payment-response",
    b"date",
    b"server",
}


@dataclass(frozen=True)
class PayerHeaders:
    payer: str
    transaction: str
    amount: int
    network: str
    payment_id: str
    timestamp: int


def _message(method: str, path: str, values: PayerHeaders) -> bytes:
    lines = (
        SIGNATURE_VERSION,
        str(values.timestamp),
        method.upper(),
        path,
        values.payer,
        values.transaction,
        str(values.amount),
        values.network,
        values.payment_id,
    )
    return "\n".join(lines).encode("utf-8")


def sign_payer_headers(secret: bytes, method: str, path: str, values: PayerHeaders) -> str:
    return hmac.new(secret, _message(method, path, values), hashlib.sha256).hexdigest()


def payer_headers(
    values: PayerHeaders, *, method: str, path: str, secret: bytes | None
) -> list[tuple[bytes, bytes]]:
    """The `X-X402-*` headers for one paid request (unsigned when no secret is configured)."""
    out = [
        (b"x-x402-payer", values.payer),
        (b"x-x402-transaction", values.transaction),
        (b"x-x402-amount", str(values.amount)),
        (b"x-x402-network", values.network),
        (b"x-x402-payment-id", values.payment_id),
        (b"x-x402-timestamp", str(values.timestamp)),
    ]
    if secret is not None:
        out.append((b"x-x402-signature", sign_payer_headers(secret, method, path, values)))
    return [(name, value.encode("latin-1")) for name, value in out]


def verify_payer_headers(
    headers: Mapping[str, str],
    *,
    method: str,
    path: str,
    secret: bytes,
    now: float | None = None,
    max_age_s: int = 300,
) -> PayerHeaders | None:
    """For the upstream: the payer headers if the gateway signed them for THIS request, else
    None. `headers` must be case-insensitive (Starlette/httpx headers) or lower-cased."""
    try:
        values = PayerHeaders(
            payer=headers["x-x402-payer"],
            transaction=headers["x-x402-transaction"],
            amount=int(headers["x-x402-amount"]),
            network=headers["x-x402-network"],
            payment_id=headers["x-x402-payment-id"],
            timestamp=int(headers["x-x402-timestamp"]),
        )
        signature = headers["x-x402-signature"]
    except (KeyError, ValueError):
        return None
    current = time.time() if now is None else now
    if abs(current - values.timestamp) > max_age_s:
        return None
    expected = sign_payer_headers(secret, method, path, values)
    if not hmac.compare_digest(expected, signature.lower()):
        return None
    return values


def new_upstream_client(timeout_s: float) -> httpx.AsyncClient:
    """The one upstream client (the app's lifespan owns it): no env proxies, no redirects
    followed (the client gets them), no cookie jar (cookies belong to the client)."""
    jar = http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
        trust_env=False,
        cookies=jar,
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
    )


class _ClientGone(Exception):
    """The client disconnected while its body was being sent upstream."""


class Forwarder:
    """Forward any HTTP request to `upstream` (a base URL, which may carry a path prefix)."""

    def __init__(
        self,
        upstream: str,
        *,
        client: Callable[[], httpx.AsyncClient],
        secret: bytes | None = None,
        trust_forwarded: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        url = httpx.URL(upstream)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"upstream must be an http(s) URL, got {upstream!r}")
        self.base = upstream.rstrip("/")
        self.base_path = url.raw_path.decode("ascii").split("?")[0].rstrip("/")
        self.client = client
        self.secret = secret
        self.trust_forwarded = trust_forwarded
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.forward(scope, receive, send)

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Relay one request and its answer; False when the upstream's answer broke off after
        its status line was sent (the client saw a cut connection, not the whole answer)."""
        if scope["type"] != "http":
            return True  # websockets are not proxied
        method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        path = raw_path.decode("latin-1")
        query: bytes = scope.get("query_string", b"")
        target = self.base + path + ("?" + query.decode("latin-1") if query else "")
        headers = self._request_headers(scope, self.base_path + path)
        content: AsyncIterator[bytes] | bytes | None = None
        if _has_body(scope):
            content = _body_of(receive)
        request = httpx.Request(method, target, headers=headers, content=content)
        try:
            response = await self.client().send(request, stream=True)
        except _ClientGone:
            return True
        except httpx.TimeoutException:
            log.warning("upstream timeout %s %s", method, scope["path"])
            await _problem(UpstreamTimeout("the upstream did not answer in time"), scope, send)
            return True
        except httpx.HTTPError as exc:
            log.warning("upstream unreachable %s %s: %s", method, scope["path"], type(exc).__name__)
            await _problem(UpstreamUnreachable("the upstream could not be reached"), scope, send)
            return True
        try:
            return await self._relay(response, receive, send)
        finally:
            await response.aclose()

    def _request_headers(self, scope: Scope, upstream_path: str) -> list[tuple[bytes, bytes]]:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        connection_named = _connection_tokens(raw)
        out: list[tuple[bytes, bytes]] = []
        prior: dict[bytes, bytes] = {}
        host = b""
        for name, value in raw:
            if name == b"host":
                host = host or value
            if name in _FORWARDED:
                prior.setdefault(name, value)
                continue
            if (
                name in _REQUEST_DROP
                or name in connection_named
                or name.startswith(b"x-x402-")
                or (name == b"forwarded" and not self.trust_forwarded)
            ):
                continue
            out.append((name, value))
        client = scope.get("client")
        client_ip = str(client[0]).encode("latin-1") if client else b"unknown"
        scheme = str(scope.get("scheme", "http")).encode("latin-1")
        if self.trust_forwarded:
            chain = prior.get(b"x-forwarded-for")
            forwarded_for = chain + b", " + client_ip if chain else client_ip
            scheme = prior.get(b"x-forwarded-proto", scheme)
            host = prior.get(b"x-forwarded-host", host)
        else:
            forwarded_for = client_ip
        out.append((b"x-forwarded-for", forwarded_for))
        out.append((b"x-forwarded-proto", scheme))
        if host:
            out.append((b"x-forwarded-host", host))
        paid = scope.get("state", {}).get(PAID_STATE_KEY)
        if isinstance(paid, PaidRequest):
            settled = paid.settled
            values = PayerHeaders(
                payer=settled.payer,
                transaction=settled.tx_hash,
                amount=settled.amount,
                network=settled.network.caip2,
                payment_id=settled.payment_id,
                timestamp=int(self.clock()),
            )
            out.extend(
                payer_headers(
                    values, method=scope["method"], path=upstream_path, secret=self.secret
                )
            )
        return out

    async def _relay(self, response: httpx.Response, receive: Receive, send: Send) -> bool:
        connection_named = _connection_tokens(response.headers.raw)
        headers = [
            (name.lower(), value)
            for name, value in response.headers.raw
            if name.lower() not in _RESPONSE_DROP and name.lower() not in connection_named
        ]
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        async with anyio.create_task_group() as group:

            async def watch_disconnect() -> None:
                # A client that went away must stop an endless upstream stream (SSE, say).
                while True:
                    message: Message = await receive()
                    if message["type"] == "http.disconnect":
                        group.cancel_scope.cancel()
                        return

            group.start_soon(watch_disconnect)
            try:
                async for chunk in response.aiter_raw():
                    if chunk:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except httpx.HTTPError as exc:
                # The status line is gone: ending without the final body message makes the
                # server cut the connection, the only honest signal left to the client.
                log.warning("upstream stream broke: %s", type(exc).__name__)
                return False
            finally:
                group.cancel_scope.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True


def _has_body(scope: Scope) -> bool:
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"content-length":
            return value.strip() != b"0"
        if name == b"transfer-encoding":
            return True
    return False


async def _body_of(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk: bytes = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def _connection_tokens(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in `Connection` (hop-by-hop by declaration)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return frozenset(names)


async def _problem(problem: HTTPProblem, scope: Scope, send: Send) -> None:
    async def nothing() -> Message:
        return {"type": "http.disconnect"}

    await problem_response(problem)(scope, nothing, send)

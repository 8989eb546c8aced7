"""A small HTTP/1.1 load generator: one keep-alive connection per worker, raw bytes, uvloop.

httpx costs ~0.5 ms of client CPU per request and one shared client tops out near 190 req/s;
on a 2-core machine the client would be measured instead of the server. Here a request is a
prebuilt byte string and a response is parsed just enough to find its end (Content-Length or
chunked), so the client spends a few microseconds per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:\s*chunked", re.IGNORECASE)


def build_request(
    method: str,
    host: str,
    path: str,
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
    if body or method in ("POST", "PUT"):
        lines.append("content-type: application/json")
        lines.append(f"content-length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    head: bytes  # status line and headers
    body: bytes

    def header(self, name: str) -> str | None:
        needle = b"\r\n" + name.lower().encode() + b":"
        low = self.head.lower()
        at = low.find(needle)
        if at < 0:
            return None
        start = at + len(needle)
        end = self.head.find(b"\r\n", start)
        return self.head[start : end if end >= 0 else None].strip().decode("latin-1")


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self._buf = bytearray()
        self._waiter: asyncio.Future[Response] | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError(f"connection lost: {exc}"))

    def _complete(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self._buf[:end])
        start = end + 4
        length = _CONTENT_LENGTH.search(head)
        if length is not None:
            stop = start + int(length.group(1))
            if len(self._buf) < stop:
                return
            body = bytes(self._buf[start:stop])
        elif _CHUNKED.search(head):
            parsed = _parse_chunked(self._buf, start)
            if parsed is None:
                return
            body, stop = parsed
        else:
            body, stop = b"", start
        del self._buf[:stop]
        waiter.set_result(Response(int(head[9:12]), head, body))

    async def request(self, raw: bytes, timeout: float = 60.0) -> Response:  # noqa: ASYNC109
        assert self._transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(raw)
        self._complete()
        try:
            return await asyncio.wait_for(self._waiter, timeout)
        except TimeoutError:
            self.close()  # a late answer must not be taken for the next request's
            raise ConnectionError("no response in time") from None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _parse_chunked(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    parts: list[bytes] = []
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
        pos = line_end + 2
        if size == 0:
            if len(buf) < pos + 2:
                return None
            return b"".join(parts), pos + 2
        if len(buf) < pos + size + 2:
            return None
        parts.append(bytes(buf[pos : pos + size]))
        pos += size + 2


async def connect(port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    transport, conn = await loop.create_connection(_Connection, "127.0.0.1", port)
    transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


async def fetch(port: int, raw: bytes) -> Response:
    conn = await connect(port)
    try:
        return await conn.request(raw)
    finally:
        conn.close()


@dataclass
class Run:
    """Outcome of one timed run: successes, their latencies (s) and the elapsed wall time."""

    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def closed_loop(
    port: int,
    requests: Iterator[bytes],
    *,
    concurrency: int,
    seconds: float,
    expect: int,
) -> Run:
    """`concurrency` workers, each on its own connection, send requests back to back until the
    iterator or the time runs out. Only responses with status `expect` count as successes."""
    run = Run()
    conns = [await connect(port) for _ in range(concurrency)]
    start = time.perf_counter()
    deadline = start + seconds
    last_done = start

    async def worker(conn: _Connection) -> None:
        nonlocal last_done
        while time.perf_counter() < deadline:
            raw = next(requests, None)
            if raw is None:
                return
            t0 = time.perf_counter()
            try:
                response = await conn.request(raw)
            except ConnectionError:
                run.error("connection")
                return
            t1 = time.perf_counter()
            last_done = max(last_done, t1)
            if response.status == expect:
                run.ok += 1
                run.latencies.append(t1 - t0)
            else:
                run.error(str(response.status))

    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for conn in conns:
            conn.close()
    run.elapsed = last_done - start
    return run


async def probe(port: int, raw: bytes, stop: asyncio.Event, interval: float = 0.02) -> list[float]:
    """Latency of a free request sent every `interval` s until `stop` is set (event-loop stalls
    of the server show up here)."""
    latencies: list[float] = []
    conn = await connect(port)
    try:
        while not stop.is_set():
            t0 = time.perf_counter()
            await conn.request(raw)
            latencies.append(time.perf_counter() - t0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    finally:
        conn.close()
    return latencies

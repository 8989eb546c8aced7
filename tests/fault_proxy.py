"""A TCP proxy for fault injection in tests, e.g. between the gateway and its node: cut (refuse
and drop every connection), delay every answer, or swallow the answer to one request and then go
down: every byte of the request matching ``cut_on`` (a JSON-RPC method, an HTTP request line) is
forwarded, and the connection is cut the moment the answer starts to come back (the peer acted,
the caller never hears: a flap mid-settlement)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Pair:
    client: socket.socket
    upstream: socket.socket
    blackhole: bool = False
    tail: bytes = b""


@dataclass(eq=False)
class FaultProxy:
    target_host: str
    target_port: int
    delay_s: float = 0.0
    cut_on: bytes | None = None  # a JSON-RPC method name, e.g. b"eth_sendRawTransaction"
    up: bool = True
    swallowed: int = 0  # answers eaten by cut_on
    _pairs: set[_Pair] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopped: bool = False

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    @classmethod
    def to(cls, url: str) -> FaultProxy:
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        return cls(host, int(port)).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def cut(self) -> None:
        self.up = False
        with self._lock:
            pairs, self._pairs = self._pairs, set()
        for pair in pairs:
            _close(pair.client, pair.upstream)

    def restore(self) -> None:
        self.cut_on = None
        self.delay_s = 0.0
        self.up = True

    def stop(self) -> None:
        self._stopped = True
        self.cut()
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
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection((self.target_host, self.target_port), 5)
            except OSError:
                client.close()
                continue
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.add(pair)
            threading.Thread(target=self._to_node, args=(pair,), daemon=True).start()
            threading.Thread(target=self._to_gateway, args=(pair,), daemon=True).start()

    def restore_after_cut(self, limit_s: float = 10.0) -> threading.Thread:
        """Bring the proxy back as soon as it swallowed an answer (the caller's retry then
        gets through). Runs in a thread; join it."""

        def watch() -> None:
            deadline = time.monotonic() + limit_s
            while time.monotonic() < deadline:
                if self.swallowed and not self.up:
                    self.restore()
                    return
                time.sleep(0.005)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread

    def _to_node(self, pair: _Pair) -> None:
        try:
            while True:
                data = pair.client.recv(65536)
                if not data:
                    break
                marker = self.cut_on
                if marker is not None and marker in pair.tail + data:
                    pair.blackhole = True  # its answer must never reach the caller
                pair.upstream.sendall(data)
                pair.tail = data[-64:]
        except OSError:
            pass
        finally:
            self._drop(pair)

    def _to_gateway(self, pair: _Pair) -> None:
        try:
            while True:
                data = pair.upstream.recv(65536)
                if not data:
                    break
                if pair.blackhole:  # the peer has acted on the request: now go down
                    self.swallowed += 1
                    self.cut()
                    break
                if self.delay_s:
                    time.sleep(self.delay_s)
                if not self.up:
                    continue
                pair.client.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(pair)

    def _drop(self, pair: _Pair) -> None:
        _close(pair.client, pair.upstream)
        with self._lock:
            self._pairs.discard(pair)


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

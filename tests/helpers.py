"""Small generic helpers shared by tests (no fixtures here; see conftest.py)."""

from __future__ import annotations

import socket

from eth_abi.abi import decode

from payments.localchain import RpcError

__all__ = ["free_port", "revert_reason"]

_ERROR_STRING_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def revert_reason(error: RpcError) -> str:
    """The Error(string) revert reason carried by a JSON-RPC error ('' if there is none)."""
    if not error.data:
        return ""
    raw = bytes.fromhex(error.data.removeprefix("0x"))
    if raw[:4] != _ERROR_STRING_SELECTOR:
        return ""
    (reason,) = decode(["string"], raw[4:])
    return str(reason)

"""Fixtures of the reliability suite: the facts recorder, and a safety net that keeps every
connection this process opens on loopback.

The SSRF tests hand the gateway URLs of private, link-local, multicast and metadata addresses.
The gateway must refuse them before connecting; if a regression ever let one through, this
process would send real packets off the machine. An audit hook (PEP 578) refuses any
`socket.connect`/`sendto` to a non-loopback address (and the test that triggered it fails even
if the code under test swallowed the error); a name lookup other than `localhost` fails as an
unknown name would, before any DNS packet is sent.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.reliability.facts import Recorder, results_path
from tests.reliability.harness import USDC, Key, new_key

_NET_GUARD: dict[str, Any] = {"on": False, "violations": []}


def _loopback(host: object) -> bool:
    if not isinstance(host, str):
        return True  # AF_UNIX paths and the like: not a network destination
    text = host.split("%", 1)[0]
    if text in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


# inet_aton forms (2130706433, 0x7f000001, 0177.0.0.1, 127.1): parsed by libc, never sent to DNS
_NUMERIC_HOST = re.compile(r"(?:0[xX][0-9a-fA-F]+|[0-9]+)(?:\.(?:0[xX][0-9a-fA-F]+|[0-9]+)){0,3}")


def _lookup_allowed(host: object) -> bool:
    if host is None or isinstance(host, bytes | bytearray):
        host = host.decode() if host else ""
    assert isinstance(host, str)
    if host in ("localhost", "") or _NUMERIC_HOST.fullmatch(host):
        return True
    try:
        ipaddress.ip_address(host.split("%", 1)[0])  # a literal: no packet leaves
    except ValueError:
        return False
    return True


_WATCHED = frozenset({"socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo"})


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event not in _WATCHED or not _NET_GUARD["on"]:
        return
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        address = args[1] if len(args) > 1 else None
        if isinstance(address, tuple) and address and not _loopback(address[0]):
            _NET_GUARD["violations"].append(f"{event} {address[0]}")
            raise PermissionError(f"reliability net guard: {event} to {address[0]} refused")
    elif event == "socket.getaddrinfo" and not _lookup_allowed(args[0]):
        # No packet has left yet: answer as a resolver without the name would.
        raise socket.gaierror(socket.EAI_NONAME, f"net guard: {args[0]!r} not resolved")


@pytest.fixture(scope="session")
def _net_guard_installed() -> None:
    # Installed when the first reliability test starts, not at import: an audit hook cannot be
    # removed, and even idle it costs every audited event of the process a Python call.
    sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def loopback_only(_net_guard_installed: None) -> Iterator[None]:
    _NET_GUARD["violations"] = []
    _NET_GUARD["on"] = True
    try:
        yield
    finally:
        _NET_GUARD["on"] = False
    assert not _NET_GUARD["violations"], f"non-loopback traffic attempted: {_NET_GUARD}"


@pytest.fixture
def make_payer(local_chain: Any) -> Callable[..., Key]:
    """Factory: a fresh key holding `usdc` test USDC (no ETH: the settler pays the gas)."""

    def make(usdc: int = 10 * USDC) -> Key:
        key = new_key()
        if usdc:
            local_chain.fund(key.address, usdc=usdc)
        return key

    return make


@pytest.fixture
def facts(request: pytest.FixtureRequest) -> Recorder:
    return Recorder(results_path(), request.node.nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        Recorder(results_path(), report.nodeid).record(
            "outcome",
            outcome=report.outcome,
            xfail=hasattr(report, "wasxfail"),
            seconds=round(report.duration, 3),
        )

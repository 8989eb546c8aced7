"""The suite's own safety net: with the guard on, nothing may leave loopback (checked on the
hook itself, so a broken guard cannot send a packet while being tested)."""

from __future__ import annotations

import socket

import pytest

from tests.reliability import conftest


def test_non_loopback_connects_are_refused_and_recorded() -> None:
    try:
        for address in (("10.0.0.1", 80), ("169.254.169.254", 80), ("2001:db8::1", 443, 0, 0)):
            with pytest.raises(PermissionError):
                conftest._audit("socket.connect", (None, address))
        assert len(conftest._NET_GUARD["violations"]) == 3
    finally:
        conftest._NET_GUARD["violations"] = []


def test_loopback_and_local_names_pass() -> None:
    for address in (("127.0.0.1", 80), ("::1", 80, 0, 0), ("localhost", 80), "/tmp/sock"):
        conftest._audit("socket.connect", (None, address))
    for host in ("localhost", "127.0.0.1", "2130706433", "0x7f000001", "10.0.0.1", None):
        conftest._audit("socket.getaddrinfo", (host, 80, 0, 0, 0))
    assert conftest._NET_GUARD["violations"] == []


def test_other_names_fail_as_unresolvable_before_any_dns() -> None:
    with pytest.raises(socket.gaierror):
        conftest._audit("socket.getaddrinfo", ("metadata.google.internal", 80, 0, 0, 0))

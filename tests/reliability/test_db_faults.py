"""Database faults on the real gateway: a paid request meets a locked database, a read-only
database file, or a full disk -> 503 with Retry-After, nothing charged on chain, the database
intact (PRAGMA integrity_check) and, once the fault is gone, the SAME payment header pays once.

- locked: another connection holds an EXCLUSIVE lock (the ledger waits its busy timeout);
- read-only: the database file and its WAL are made immutable (`chattr +i`: even root cannot
  write them; the WAL index stays writable, as SQLite maps it);
- disk full: RLIMIT_FSIZE on the gateway process (a subprocess, its output on a pipe): every
  write that would grow a file fails with EFBIG, which SQLite reports as "database or disk is
  full", exactly as on a full disk.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.reliability.facts import Recorder
from tests.reliability.harness import (
    BODY,
    GatewayProcess,
    Key,
    gateway_process,
    integrity_ok,
    ledger_rows,
    signed_payment,
    start_inprocess,
)


async def _post(url: str, header: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        return await http.post(
            "/generation/create", json=BODY, headers={"PAYMENT-SIGNATURE": header}
        )


def _assert_503(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) > 0
    assert r.json()["error"] == "service_unavailable"


def _rows_of(database: Path, payer: Key) -> list[dict[str, Any]]:
    return [row for row in ledger_rows(database) if row["payer"] == payer.address]


async def test_locked_database_is_503_no_charge_then_pays_once(
    local_chain: Any, tmp_path: Path, make_payer: Any, facts: Recorder
) -> None:
    gw = start_inprocess(local_chain, tmp_path)
    try:
        payer = make_payer()
        amount, header = await signed_payment(gw.url, payer)
        before = local_chain.usdc_balance(payer.address)
        locker = sqlite3.connect(str(gw.settings.database), timeout=1, isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            started = time.monotonic()
            r = await _post(gw.url, header)
            waited = time.monotonic() - started
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        _assert_503(r)
        assert local_chain.usdc_balance(payer.address) == before
        assert _rows_of(gw.settings.database, payer) == []

        r = await _post(gw.url, header)  # lock gone: the same authorization pays, once
        assert r.status_code == 202, r.text
        assert local_chain.usdc_balance(payer.address) == before - amount
        assert len(_rows_of(gw.settings.database, payer)) == 1
    finally:
        gw.stop()
    assert integrity_ok(gw.settings.database)
    facts.record(
        "fault",
        fault="sqlite locked (exclusive lock held)",
        status=503,
        charged=False,
        retry="paid once",
        integrity="ok",
        waited_s=round(waited, 2),
    )


def _chattr(flag: str, *paths: Path) -> None:
    for path in paths:
        if path.exists():
            subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True)


@pytest.fixture
def immutable_ok(tmp_path: Path) -> None:
    probe = tmp_path / "chattr-probe"
    probe.write_text("x")
    if shutil.which("chattr") is None:
        pytest.skip("chattr not installed")
    done = subprocess.run(["chattr", "+i", str(probe)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"this filesystem has no immutable flag: {done.stderr.decode().strip()}")
    _chattr("-i", probe)


async def test_read_only_database_file_is_503_no_charge_then_pays_once(
    local_chain: Any, tmp_path: Path, make_payer: Any, immutable_ok: None, facts: Recorder
) -> None:
    gw = start_inprocess(local_chain, tmp_path)
    database = gw.settings.database
    files = (database, database.with_name(database.name + "-wal"))
    try:
        payer = make_payer()
        amount, header = await signed_payment(gw.url, payer)
        before = local_chain.usdc_balance(payer.address)
        _chattr("+i", *files)
        try:
            r = await _post(gw.url, header)
            async with httpx.AsyncClient(base_url=gw.url) as http:
                status_read = (await http.get("/generation/unknown/status")).status_code
        finally:
            _chattr("-i", *files)
        _assert_503(r)
        assert status_read == 404  # reads still work while writes cannot
        assert local_chain.usdc_balance(payer.address) == before
        assert _rows_of(database, payer) == []

        r = await _post(gw.url, header)
        assert r.status_code == 202, r.text
        assert local_chain.usdc_balance(payer.address) == before - amount
        assert len(_rows_of(database, payer)) == 1
    finally:
        _chattr("-i", *files)
        gw.stop()
    assert integrity_ok(database)
    facts.record(
        "fault",
        fault="read-only database file (chattr +i)",
        status=503,
        charged=False,
        retry="paid once",
        integrity="ok",
    )


@contextlib.contextmanager
def _pipe_reader(proc: subprocess.Popen[bytes], sink: list[bytes]) -> Iterator[None]:
    assert proc.stdout is not None
    stream = proc.stdout

    def pump() -> None:
        for line in iter(stream.readline, b""):
            sink.append(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(timeout=5)


async def test_disk_full_is_503_no_charge_then_pays_once(
    local_chain: Any, tmp_path: Path, make_payer: Any, facts: Recorder
) -> None:
    gw: GatewayProcess = gateway_process(local_chain, tmp_path)
    # Output on a pipe: the file-size limit below must only bite the database.
    gw.proc = _spawn_piped(gw)
    output: list[bytes] = []
    with _pipe_reader(gw.proc, output):
        try:
            gw.wait_up()
            control = make_payer()
            _, header = await signed_payment(gw.url, control)
            assert (await _post(gw.url, header)).status_code == 202  # the database works

            payer = make_payer()
            amount, header = await signed_payment(gw.url, payer)
            before = local_chain.usdc_balance(payer.address)
            wal = gw.database.with_name(gw.database.name + "-wal")
            limit = max(wal.stat().st_size, 4096)
            infinity = resource.RLIM_INFINITY
            # soft limit only: lifting it again needs no privilege
            resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (limit, infinity))
            try:
                r = await _post(gw.url, header)
            finally:
                resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (infinity, infinity))
            _assert_503(r)
            assert local_chain.usdc_balance(payer.address) == before
            assert gw.proc.poll() is None, "the gateway died on a full disk"

            r = await _post(gw.url, header)
            assert r.status_code == 202, r.text
            assert local_chain.usdc_balance(payer.address) == before - amount
            assert len(_rows_of(gw.database, payer)) == 1
        finally:
            gw.stop()
    assert integrity_ok(gw.database)
    log = b"".join(output).decode("utf-8", "replace")
    # the gateway's own line says why (not a worker that happened to write in the window)
    faults = [line for line in log.splitlines() if "payment infrastructure fault" in line]
    assert any("ledger" in line and "disk" in line for line in faults), log[-2000:]
    facts.record(
        "fault",
        fault="disk full (RLIMIT_FSIZE on the gateway)",
        status=503,
        charged=False,
        retry="paid once",
        integrity="ok",
    )


def _spawn_piped(gw: GatewayProcess) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(gw.port)],
        env=gw.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

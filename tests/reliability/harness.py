"""The real gateway for reliability tests: in-process (uvicorn thread) or as a subprocess that
can be SIGKILLed and restarted on the same database; plus payers and ledger/chain checks."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from gateway.app import create_app
from gateway.settings import Settings
from payments.ledger import LedgerTotals, SqliteLedger
from tests.gateway.paying import decode_challenge, v2_header
from tests.gateway.server import ServerThread, free_port
from tests.helpers import Key, new_key

ETH = 10**18
USDC = 10**6
ROOT = Path(__file__).resolve().parents[2]
BODY: dict[str, Any] = {"prompt": "a lighthouse at dawn", "templateData": {"duration": 1}}


def funded_settler(local_chain: Any) -> Key:
    settler = new_key()
    local_chain.fund(settler.address, eth_wei=10 * ETH)
    return settler


# --------------------------------------------------------------------------- in-process


@dataclass
class InProcessGateway:
    url: str
    pay_to: str
    settings: Settings
    server: ServerThread
    settler: Key

    def stop(self) -> None:
        self.server.stop()


def start_inprocess(
    local_chain: Any,
    tmp: Path,
    *,
    rpc_url: str | None = None,
    settler: Key | None = None,
    port: int | None = None,
    **overrides: Any,
) -> InProcessGateway:
    """A real gateway on a free port. Private URLs are refused unless `overrides` allow them.
    Pass the `settler` (and `port`) of an earlier one to restart it on the same database."""
    settler = settler or funded_settler(local_chain)
    port = port or free_port()
    values: dict[str, Any] = {
        "rpc_url": rpc_url or local_chain.rpc_url,
        "settler_key": SecretStr(settler.key),
        "database": tmp / "gateway.db",
        "media_dir": tmp / "media",
        "public_base_url": f"http://127.0.0.1:{port}",
        "allow_private_urls": False,
        **overrides,
    }
    settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
    server = ServerThread(create_app(settings), port).start()
    return InProcessGateway(
        url=server.url, pay_to=settler.address, settings=settings, server=server, settler=settler
    )


# --------------------------------------------------------------------------- subprocess


@dataclass
class GatewayProcess:
    """`python -m gateway.cli serve` with X402_* settings; all output goes to `log_path`
    (a file, not a pipe: a DEBUG-logging gateway must never block on a full pipe)."""

    env: dict[str, str]
    port: int
    log_path: Path
    settler: Key
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _log: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database(self) -> Path:
        return Path(self.env["X402_DATABASE"])

    def start(self, extra_env: Mapping[str, str] | None = None) -> GatewayProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _closed_log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(self.port)],
            env={**self.env, **(extra_env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
        )
        self.starts += 1
        return self

    def wait_up(self, limit_s: float = 60) -> None:
        deadline = time.monotonic() + limit_s
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"gateway did not come up:\n{self.output()[-4000:]}")

    def wait_dead(self, limit_s: float = 60) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=limit_s)
        self._closed_log()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._closed_log()

    def stop(self) -> None:
        """SIGTERM (graceful: uvicorn drains), SIGKILL if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._closed_log()

    def _closed_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def output(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "replace")


def gateway_process(
    local_chain: Any, tmp: Path, *, rpc_url: str | None = None, **env: str
) -> GatewayProcess:
    settler = funded_settler(local_chain)
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("X402_") and k != "PYTHONPATH"}
    return GatewayProcess(
        env={
            **base,
            "PYTHONPATH": str(ROOT),
            "X402_RPC_URL": rpc_url or local_chain.rpc_url,
            "X402_SETTLER_KEY": settler.key,
            "X402_DATABASE": str(tmp / "gw.db"),
            "X402_MEDIA_DIR": str(tmp / "media"),
            "X402_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
            "X402_LOG_LEVEL": "INFO",
            **env,
        },
        port=port,
        log_path=tmp / "gateway.log",
        settler=settler,
    )


# --------------------------------------------------------------------------- paying


async def challenge_for(http: httpx.AsyncClient, body: Mapping[str, Any]) -> tuple[int, str]:
    """(amount, PAYMENT-REQUIRED header) quoted for `body`."""
    r = await http.post("/generation/create", json=dict(body))
    assert r.status_code == 402, r.text
    header = r.headers["payment-required"]
    return int(decode_challenge(header)["accepts"][0]["amount"]), header


async def signed_payment(url: str, key: Key, body: Mapping[str, Any] = BODY) -> tuple[int, str]:
    """(amount, PAYMENT-SIGNATURE) for `body`, signed by `key`."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        amount, header = await challenge_for(http, body)
    return amount, v2_header(header, key.key)


def header_nonce(payment_header: str) -> str:
    payload = json.loads(base64.b64decode(payment_header))
    nonce: str = payload["payload"]["authorization"]["nonce"]
    return nonce


async def wait_status(
    url: str, task_id: str, want: set[str], limit_s: float = 60, *, refund: bool = False
) -> dict[str, Any]:
    """Poll until the task is in `want` (and, with `refund`, its refund is confirmed)."""
    deadline = time.monotonic() + limit_s
    last: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while time.monotonic() < deadline:
            r = await http.get(f"/generation/{task_id}/status")
            assert r.status_code < 500 or r.json().get("status") == "failed", r.text
            last = r.json()
            done = last.get("status") in want
            if done and (not refund or last.get("refund", {}).get("status") == "confirmed"):
                return last
            await asyncio.sleep(0.1)
    raise AssertionError(f"task {task_id} not {want} within {limit_s} s: {last}")


# --------------------------------------------------------------------------- ledger


def ledger_rows(database: Path) -> list[dict[str, Any]]:
    """Every payments row, read with a separate read-only connection."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM payments ORDER BY created_at_ms")]
    finally:
        conn.close()


def task_rows(database: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    try:
        conn.row_factory = sqlite3.Row
        return [
            dict(r) for r in conn.execute("SELECT id, state, payment_ref, error_code FROM tasks")
        ]
    finally:
        conn.close()


async def ledger_totals(database: Path) -> LedgerTotals:
    ledger = await SqliteLedger(database).open()
    try:
        return await ledger.totals()
    finally:
        await ledger.close()


def integrity_ok(database: Path) -> bool:
    conn = sqlite3.connect(str(database), timeout=10)
    try:
        return bool(conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok")
    finally:
        conn.close()

"""`scripts/dev` (the README's first command) brings up chain + gateway, and a script pays it
using nothing but the `dev.json` it writes; SIGINT or SIGTERM stops both cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.gateway.server import free_port

REPO = Path(__file__).resolve().parents[2]

PAYER_SCRIPT = r"""
import asyncio, json, sys
from eth_account import Account
from x402 import x402Client
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.exact import register_exact_evm_client

info = json.load(open(sys.argv[1]))
async def main():
    payer = Account.from_key(info["payers"][0]["privateKey"])
    client = register_exact_evm_client(x402Client(), payer)
    body = {"prompt": "dev", "templateData": {"duration": 4}}
    async with x402HttpxClient(client, base_url=info["gatewayUrl"], timeout=30) as http:
        r = await http.post("/generation/create", json=body)
        print(json.dumps({"status": r.status_code, "body": r.json()}))
asyncio.run(main())
"""


def _rpc(url: str, method: str, params: list[object]) -> object:
    r = httpx.post(url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    return r.json()["result"]


def _usdc_balance(rpc_url: str, asset: str, address: str) -> int:
    data = "0x70a08231" + address.lower().removeprefix("0x").rjust(64, "0")
    result = _rpc(rpc_url, "eth_call", [{"to": asset, "data": data}, "latest"])
    assert isinstance(result, str)
    return int(result, 16)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_dev_command_runs_and_a_script_pays_it_from_dev_json(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    state = tmp_path / "state"
    port = free_port()
    proc = subprocess.Popen(
        [str(REPO / "scripts" / "dev"), "--port", str(port), "--state-dir", str(state)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "X402_LOG_LEVEL": "WARNING"},
    )
    try:
        dev_json = state / "dev.json"
        deadline = time.monotonic() + 120
        while not dev_json.exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "dev.json never appeared"
            time.sleep(0.1)
        info = json.loads(dev_json.read_text())
        assert info["chainId"] == 8453
        assert info["network"] == "eip155:8453"
        assert info["asset"] == "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
        payer = info["payers"][0]["address"]
        before = _usdc_balance(info["rpcUrl"], info["asset"], payer)

        out = subprocess.run(
            [sys.executable, "-c", PAYER_SCRIPT, str(dev_json)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["status"] == 202, result
        assert result["body"]["taskId"]
        after = _usdc_balance(info["rpcUrl"], info["asset"], payer)
        assert 0 < before - after <= 1_000_000

        rpc_url = info["rpcUrl"]
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=60) == 0
        try:  # the chain went down with the gateway
            httpx.post(
                rpc_url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"}, timeout=2
            )
        except httpx.TransportError:
            pass
        else:
            raise AssertionError("anvil still answers after the dev command stopped")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

"""Interop: the official npm client (`@x402/fetch` + `@x402/evm` + `viem`, pinned in package.json)
pays the real gateway unchanged, on Anvil, with money moving on chain.

The client runs as a real Node process (tests/interop/js/pay.mjs) configured as its README shows;
this side only quotes, funds and reads balances. The v1 case hides the PAYMENT-REQUIRED header
from the client so that the library's own v1 fallback pays from the gateway's v1 JSON body."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from payments import decode_payment_required, decode_settle_response
from payments.localchain import LocalChain
from tests.gateway.conftest import Gateway, start_gateway

pytestmark = pytest.mark.chain

ROOT = Path(__file__).resolve().parents[2]
PAY_SCRIPT = Path(__file__).resolve().parent / "js" / "pay.mjs"
NODE = shutil.which("node")
BODY: dict[str, Any] = {
    "prompt": "a lighthouse at dawn, seen by the npm client",
    "templateData": {"duration": 4},
}
PATH = "/generation/create"

if NODE is None:
    pytest.skip("node is not installed: cannot run the npm x402 client", allow_module_level=True)


@pytest.fixture(scope="module")
def gateway(local_chain: LocalChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    if not (ROOT / "node_modules" / "@x402" / "fetch").is_dir():
        pytest.fail("@x402/fetch is not installed: run scripts/setup (npm install --no-save)")
    gw = start_gateway(local_chain, tmp_path_factory.mktemp("npm-interop"))
    try:
        yield gw
    finally:
        gw.server.stop()


def new_payer(local_chain: LocalChain) -> tuple[str, str]:
    account = Account.create()
    local_chain.fund(account.address, usdc=10_000_000)
    return account.address, "0x" + bytes(account.key).hex()


def quoted_amount(gateway: Gateway) -> int:
    """The price of BODY, from an unpaid 402 (both forms must agree)."""
    r = httpx.post(gateway.url + PATH, json=BODY, timeout=10)
    assert r.status_code == 402, r.text
    amount_v1 = int(r.json()["accepts"][0]["maxAmountRequired"])
    challenge = decode_payment_required(r.headers["payment-required"])
    amount_v2 = int(challenge.accepts[0].amount)
    assert amount_v1 == amount_v2
    return amount_v2


def run_npm_client(gateway: Gateway, key: str, mode: str) -> dict[str, Any]:
    assert NODE is not None
    env = {**os.environ, "X402_PAYER_KEY": key}  # the key stays out of the process list
    proc = subprocess.run(
        [NODE, str(PAY_SCRIPT), gateway.url, mode, json.dumps(BODY)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"npm client printed nothing (exit {proc.returncode}): {proc.stderr[-2000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0, f"npm client failed: {result.get('error')} {proc.stderr[-2000:]}"
    return result


@pytest.mark.parametrize(
    ("mode", "payment_header", "settlement_header", "network"),
    [
        ("v2", "PAYMENT-SIGNATURE", "PAYMENT-RESPONSE", "eip155:8453"),
        ("v1", "X-PAYMENT", "X-PAYMENT-RESPONSE", "base"),
    ],
)
def test_npm_fetch_client_pays_the_gateway(
    gateway: Gateway,
    local_chain: LocalChain,
    mode: str,
    payment_header: str,
    settlement_header: str,
    network: str,
) -> None:
    payer, key = new_payer(local_chain)
    amount = quoted_amount(gateway)
    payer_before = local_chain.usdc_balance(payer)
    pay_to_before = local_chain.usdc_balance(gateway.pay_to)

    result = run_npm_client(gateway, key, mode)

    # One unpaid request, then one paid retry with the header of the chosen protocol version.
    assert result["requests"] == [
        {"method": "POST", "path": PATH, "paymentHeader": None, "status": 402},
        {"method": "POST", "path": PATH, "paymentHeader": payment_header, "status": 202},
    ]
    assert result["status"] == 202, result["body"]
    assert result["settlementHeaders"] == [settlement_header]
    task_id = result["body"]["taskId"]
    assert isinstance(task_id, str) and task_id

    receipt = decode_settle_response(result["paymentResponseHeader"])
    assert receipt.success
    assert receipt.network == network
    assert receipt.payer is not None and receipt.payer.lower() == payer.lower()
    assert receipt.transaction.startswith("0x") and len(receipt.transaction) == 66
    # The library reads the same settlement from the header of its version.
    assert result["paymentResponse"]["success"] is True
    assert result["paymentResponse"]["transaction"] == receipt.transaction
    tx = local_chain.rpc("eth_getTransactionReceipt", [receipt.transaction])
    assert tx is not None and int(tx["status"], 16) == 1

    assert local_chain.usdc_balance(payer) == payer_before - amount
    assert local_chain.usdc_balance(gateway.pay_to) == pay_to_before + amount

    status = httpx.get(f"{gateway.url}/generation/{task_id}/status", timeout=10)
    assert status.status_code in (200, 202), status.text
    assert status.json()["payment"]["transaction"] == receipt.transaction

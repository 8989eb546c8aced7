"""`x402-gateway quote | generate | balance` as a user runs them: a subprocess with the key in
the environment, against the real gateway (in this process) on the session's Anvil."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.client.conftest import Key, Served
from tests.client.test_client_pays import quote, transfers
from tests.gateway.conftest import start_gateway

pytestmark = pytest.mark.chain

PROMPT = "a snowy mountain village at night"


def run_cli(
    *args: str, key: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("X402_")}
    if key is not None:
        env["X402_PRIVATE_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_generate_writes_the_video_and_reports_the_payment(
    gateway: Served, make_key: Callable[..., Key], tmp_path: Path, local_chain: Any
) -> None:
    key = make_key()
    amount = quote(gateway.url, {"prompt": PROMPT, "templateData": {"duration": 2}})
    out = tmp_path / "clip.mp4"

    done = run_cli(
        "generate", PROMPT, "--duration", "2", "--gateway", gateway.url,
        "--max-amount", "1", "--out", str(out), key=key.key,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[4:8] == b"ftyp"
    assert local_chain.usdc_balance(key.address) == 10_000_000 - amount
    tx = next(w for w in done.stdout.split() if w.startswith("0x") and len(w) == 66)
    assert transfers(local_chain, tx) == [(key.address, gateway.pay_to, amount)]
    assert "Quote:" in done.stdout and f"Saved {out}" in done.stdout
    assert key.key[2:] not in done.stdout + done.stderr  # the key never shows


def test_generate_json_mode_for_agents(
    gateway: Served, make_key: Callable[..., Key], tmp_path: Path, local_chain: Any
) -> None:
    key = make_key()
    done = run_cli(
        "generate", PROMPT, "--duration", "2", "--gateway", gateway.url,
        "--max-amount", "0.9", "--json", key=key.key, cwd=tmp_path,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    lines = events(done.stdout)
    kinds = [e["event"] for e in lines]
    assert kinds[:2] == ["quote", "paid"] and kinds[-1] == "result"
    assert set(kinds[2:-1]) == {"status"}
    quote_event, paid, result = lines[0], lines[1], lines[-1]
    assert paid["amount"] == quote_event["amount"] == result["amount"]
    assert result["status"] == "completed" and result["transaction"] == paid["transaction"]
    assert lines[-2]["status"] == "completed" and lines[-2]["progress"] == 100
    saved = tmp_path / result["out"]
    assert saved.name == f"{paid['taskId']}.mp4" and saved.stat().st_size == result["bytes"]
    amount = int(paid["amount"])
    assert transfers(local_chain, paid["transaction"]) == [(key.address, gateway.pay_to, amount)]
    assert local_chain.usdc_balance(key.address) == 10_000_000 - amount


def test_generate_refuses_a_quote_above_max_amount(
    gateway: Served, make_key: Callable[..., Key], tmp_path: Path, local_chain: Any
) -> None:
    key = make_key()
    amount = quote(gateway.url, {"prompt": PROMPT, "templateData": {"duration": 2}})
    below = f"{(amount - 1) / 1_000_000:.6f}"
    mark = gateway.recorder.mark()

    done = run_cli(
        "generate", PROMPT, "--duration", "2", "--gateway", gateway.url,
        "--max-amount", below, "--out", str(tmp_path / "x.mp4"), "--json", key=key.key,
    )  # fmt: skip

    assert done.returncode == 3, done.stderr
    last = events(done.stdout)[-1]
    assert last["event"] == "error" and last["reason"] == "amount_above_max"
    assert len(done.stderr.strip().splitlines()) == 1 and "above --max-amount" in done.stderr
    assert not any(s.paid for s in gateway.recorder.since(mark))
    assert local_chain.usdc_balance(key.address) == 10_000_000
    assert not (tmp_path / "x.mp4").exists()


def test_quote_and_balance(gateway: Served, make_key: Callable[..., Key], local_chain: Any) -> None:
    key = make_key(usdc=1_234_567)
    local_chain.fund(key.address, eth_wei=5 * 10**16)
    amount = quote(gateway.url, {"prompt": PROMPT, "templateData": {"duration": 2}})
    mark = gateway.recorder.mark()

    q = run_cli("quote", PROMPT, "--duration", "2", "--gateway", gateway.url, "--json")
    assert q.returncode == 0, q.stderr
    (shown,) = events(q.stdout)
    assert shown["event"] == "quote" and int(shown["amount"]) == amount
    assert shown["payTo"] == gateway.pay_to and shown["network"] == "eip155:8453"
    assert not any(s.paid for s in gateway.recorder.since(mark))

    b = run_cli("balance", "--rpc-url", local_chain.rpc_url, "--json", key=key.key)
    assert b.returncode == 0, b.stderr
    (bal,) = events(b.stdout)
    assert bal["address"] == key.address
    assert bal["usdc"] == "1234567" and bal["usdcFormatted"] == "1.234567"
    assert bal["ethWei"] == str(5 * 10**16) and bal["eth"] == "0.05"

    human = run_cli("balance", "--address", key.address.lower(), "--rpc-url", local_chain.rpc_url)
    assert human.returncode == 0 and "1.234567" in human.stdout

    no_key = run_cli("balance", "--rpc-url", local_chain.rpc_url)
    assert no_key.returncode == 2 and "X402_PRIVATE_KEY" in no_key.stderr


def test_for_agents_snippet_runs(
    gateway: Served, make_key: Callable[..., Key], tmp_path: Path, local_chain: Any
) -> None:
    """The README's "For agents" Python block, run as written against the real gateway."""
    doc = (Path(__file__).parents[2] / "README.md").read_text()
    section = doc.split("## For agents", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    key = make_key()
    env = {k: v for k, v in os.environ.items() if not k.startswith("X402_")}
    env.update(X402_PRIVATE_KEY=key.key, X402_GATEWAY_URL=gateway.url)
    env["PYTHONPATH"] = str(Path(__file__).parents[2])
    done = subprocess.run(
        [sys.executable, "-c", code.replace('"duration": 4', '"duration": 2')],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1].split()
    assert last[:2] == ["completed", "paid"]
    assert (tmp_path / "lighthouse.mp4").read_bytes()[4:8] == b"ftyp"
    assert transfers(local_chain, last[-1]) == [(key.address, gateway.pay_to, int(last[2]))]
    assert local_chain.usdc_balance(key.address) == 10_000_000 - int(last[2])


def test_generate_exit_codes_for_rejected_payment_and_failed_task(
    local_chain: Any, make_key: Callable[..., Key], tmp_path: Path
) -> None:
    # A real failure: 20 s of video cannot render inside a 1 s task timeout.
    gw = start_gateway(local_chain, tmp_path, task_timeout_seconds=1)
    try:
        broke = make_key(usdc=0)
        rejected = run_cli(
            "generate", "slow", "--duration", "20", "--gateway", gw.url,
            "--max-amount", "5", "--json", key=broke.key, cwd=tmp_path,
        )  # fmt: skip
        assert rejected.returncode == 4, rejected.stderr
        assert events(rejected.stdout)[-1]["reason"] == "invalid_exact_evm_insufficient_balance"
        assert len(rejected.stderr.strip().splitlines()) == 1

        key = make_key()
        failed = run_cli(
            "generate", "slow", "--duration", "20", "--gateway", gw.url,
            "--max-amount", "5", key=key.key, cwd=tmp_path,
        )  # fmt: skip
        assert failed.returncode == 5, failed.stderr
        reason = failed.stderr.strip().splitlines()[-1]
        assert "failed (timeout" in reason and "refund confirmed, tx 0x" in reason
        assert local_chain.usdc_balance(key.address) == 10_000_000  # paid, then refunded
        assert not list(tmp_path.glob("*.mp4"))
    finally:
        gw.server.stop()


@pytest.fixture
def keep_log_levels() -> Iterator[None]:
    """The CLI quiets these loggers for its own process; give them back to the test session."""
    names = ("x402", "httpx", "httpcore", "web3")
    levels = {n: logging.getLogger(n).level for n in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.usefixtures("keep_log_levels")
def test_quote_with_a_local_image_file(
    gateway: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In process this time: `--image PATH` is sent as a data: URL and priced as such."""
    from PIL import Image

    from gateway.cli import main

    png = tmp_path / "cat.png"
    Image.new("RGB", (8, 8), (200, 40, 40)).save(png)
    data_url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    expected = quote(
        gateway.url, {"prompt": PROMPT, "templateData": {"duration": 2, "image": data_url}}
    )

    code = main(
        ["quote", PROMPT, "--duration", "2", "--image", str(png), "--gateway", gateway.url,
         "--json"]
    )  # fmt: skip
    assert code == 0
    (shown,) = events(capsys.readouterr().out)
    assert int(shown["amount"]) == expected

    assert main(["quote", PROMPT, "--image", str(tmp_path / "missing.png")]) == 2
    assert "cannot read" in capsys.readouterr().err

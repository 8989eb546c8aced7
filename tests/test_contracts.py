"""The committed contract artifacts are what the committed sources compile to, with the
pinned solc-js, and the test token offers every function production code calls on USDC."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from payments._abi import ERC1271_ABI, USDC_ABI
from payments.localchain import ARTIFACTS_DIR, load_artifact

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "contracts-fixtures"
CONTRACTS = {"TestUSDC": "TestUSDC.sol", "TestWallet": "TestWallet.sol"}


def test_artifacts_rebuild_identically_with_pinned_solc() -> None:
    result = subprocess.run(
        ["node", str(FIXTURES / "build.mjs"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "artifacts match sources" in result.stdout


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_artifact_records_source_hash_and_pinned_compiler(name: str) -> None:
    artifact = load_artifact(name)
    source = (FIXTURES / CONTRACTS[name]).read_bytes()
    assert artifact["contractName"] == name
    assert artifact["sourceName"] == CONTRACTS[name]
    assert artifact["sourceSha256"] == hashlib.sha256(source).hexdigest()

    pinned = json.loads((ROOT / "package.json").read_text())["dependencies"]["solc"]
    installed = json.loads((ROOT / "node_modules" / "solc" / "package.json").read_text())
    assert installed["version"] == pinned
    assert artifact["compiler"]["name"] == "solc-js"
    assert artifact["compiler"]["version"].startswith(pinned + "+commit.")
    assert artifact["bytecode"].startswith("0x") and artifact["deployedBytecode"].startswith("0x")


def test_artifacts_dir_holds_exactly_the_contracts() -> None:
    assert sorted(p.stem for p in ARTIFACTS_DIR.glob("*.json")) == sorted(CONTRACTS)


def _signature(entry: Any) -> tuple[str, str, tuple[str, ...]]:
    return (entry["type"], entry["name"], tuple(i["type"] for i in entry.get("inputs", [])))


def _shape(entry: Any) -> tuple[Any, ...]:
    """What must agree between the production ABI and the token: types, outputs, mutability,
    indexed flags (names may differ)."""
    outputs = tuple(o["type"] for o in entry.get("outputs", []))
    indexed = tuple(bool(i.get("indexed")) for i in entry.get("inputs", []))
    return (*_signature(entry), outputs, entry.get("stateMutability"), indexed)


@pytest.mark.parametrize(
    ("artifact_name", "production_abi"),
    [("TestUSDC", USDC_ABI), ("TestWallet", ERC1271_ABI)],
)
def test_test_contracts_implement_the_production_abi(
    artifact_name: str, production_abi: Any
) -> None:
    offered = {_signature(e): _shape(e) for e in load_artifact(artifact_name)["abi"] if "name" in e}
    for entry in production_abi:
        assert _signature(entry) in offered, f"{artifact_name} lacks {_signature(entry)}"
        assert offered[_signature(entry)] == _shape(entry)

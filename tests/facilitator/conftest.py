"""Our facilitator service (uvicorn on a free 127.0.0.1 port) on the session's Anvil, with its
own settler key, and helpers that sign real EIP-3009 authorizations into facilitator bodies."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from gateway.facilitator_app import create_facilitator_app
from gateway.settings import Settings
from payments import BASE
from payments.eip3009 import Authorization, TokenDomain, random_nonce, sign_authorization
from payments.wire import exact_evm_payload
from tests.gateway.server import ServerThread, free_port
from tests.helpers import Key, new_key

ETH = 10**18
USDC = 10**6
TOKEN = "facilitator-test-token"  # a test bearer token, not a secret


@dataclass
class Service:
    url: str
    settler: str
    database: Path
    server: ServerThread

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def ledger_rows(self, payer: str) -> list[tuple[str, str | None, int, str | None]]:
        """(state, tx_hash, amount, task_id) of every ledger row of ``payer``."""
        with sqlite3.connect(self.database) as db:
            rows = db.execute(
                "SELECT state, tx_hash, amount, task_id FROM payments WHERE lower(payer) = ?",
                (payer.lower(),),
            ).fetchall()
        return [(str(s), t, int(a), k) for s, t, a, k in rows]


@pytest.fixture(scope="module")
def service(local_chain: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One facilitator per test module, settling with a fresh key (no nonce clash with other
    modules' settlers on the shared Anvil)."""
    settler = new_key()
    local_chain.fund(settler.address, eth_wei=10 * ETH)
    database = tmp_path_factory.mktemp("facilitator") / "facilitator.db"
    settings = Settings(
        _env_file=None,
        rpc_url=local_chain.rpc_url,
        settler_key=SecretStr(settler.key),
        database=database,
        facilitator_token=SecretStr(TOKEN),
    )
    server = ServerThread(create_facilitator_app(settings), free_port()).start()
    try:
        yield Service(server.url, settler.address, database, server)
    finally:
        server.stop()


@pytest.fixture
def make_payer(local_chain: Any) -> Callable[..., Key]:
    """A fresh key holding ``usdc`` atomic units of test USDC (it never sends a transaction)."""

    def make(usdc: int = 10 * USDC) -> Key:
        key = new_key()
        if usdc:
            local_chain.fund(key.address, usdc=usdc)
        return key

    return make


def requirements_v2(pay_to: str, amount: int, **override: Any) -> dict[str, Any]:
    return {
        "scheme": "exact",
        "network": BASE.caip2,
        "amount": str(amount),
        "asset": BASE.usdc,
        "payTo": pay_to,
        "maxTimeoutSeconds": 120,
        "extra": {"name": BASE.token_name, "version": BASE.token_version},
        **override,
    }


def requirements_v1(pay_to: str, amount: int, **override: Any) -> dict[str, Any]:
    return {
        "scheme": "exact",
        "network": BASE.name,
        "maxAmountRequired": str(amount),
        "resource": "http://127.0.0.1/thing",
        "description": "a thing",
        "mimeType": "application/json",
        "payTo": pay_to,
        "maxTimeoutSeconds": 120,
        "asset": BASE.usdc,
        "extra": {"name": BASE.token_name, "version": BASE.token_version},
        **override,
    }


def signed_body(
    payer: Key,
    requirements: dict[str, Any],
    *,
    version: int = 2,
    signer: Key | None = None,
    valid_before: int | None = None,
    domain_asset: str | None = None,
) -> dict[str, Any]:
    """A facilitator request body: ``payer`` authorizes exactly what ``requirements`` ask.

    ``signer`` signs instead of the payer (a forged signature); ``domain_asset`` signs under
    another token's domain; ``valid_before`` overrides the deadline."""
    now = int(time.time())
    amount = int(requirements["amount"] if version == 2 else requirements["maxAmountRequired"])
    auth = Authorization(
        from_=payer.address,
        to=requirements["payTo"],
        value=amount,
        valid_after=now - 60,
        valid_before=valid_before if valid_before is not None else now + 120,
        nonce=random_nonce(),
    )
    extra = requirements.get("extra") or {}
    domain = TokenDomain(
        extra.get("name", BASE.token_name),
        extra.get("version", BASE.token_version),
        BASE.chain_id,
        domain_asset or requirements["asset"],
    )
    signature = sign_authorization((signer or payer).key, domain, auth)
    payload: dict[str, Any]
    if version == 2:
        payload = {
            "x402Version": 2,
            "resource": {"url": "http://127.0.0.1/thing", "description": "a thing"},
            "accepted": requirements,
            "payload": exact_evm_payload(auth, signature),
        }
    else:
        payload = {
            "x402Version": 1,
            "scheme": requirements["scheme"],
            "network": requirements["network"],
            "payload": exact_evm_payload(auth, signature),
        }
    return {"x402Version": version, "paymentPayload": payload, "paymentRequirements": requirements}

"""Fixtures for the I/O half of payments: a Chain, a Settler, a ledger and a processor on the
session's Anvil (``local_chain`` from tests/conftest.py), plus real payers with real keys."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from payments.chain import Chain
from payments.eip3009 import Authorization, random_nonce, sign_authorization
from payments.ledger import SqliteLedger
from payments.networks import BASE
from payments.processor import PaymentProcessor
from payments.requirements import Requirement
from payments.settler import Settler
from payments.wire import b64_json

ETH = 10**18
USDC = 10**6


@dataclass(frozen=True)
class Payer:
    address: str
    key: str


def new_key() -> tuple[str, str]:
    acct = Account.create()
    return acct.address, "0x" + bytes(acct.key).hex()


@pytest.fixture
def make_payer(local_chain: Any) -> Callable[..., Payer]:
    """A fresh key holding ``usdc`` atomic units of the test USDC (and no ETH: it never sends)."""

    def make(usdc: int = 10 * USDC) -> Payer:
        address, key = new_key()
        if usdc:
            local_chain.fund(address, usdc=usdc)
        return Payer(address, key)

    return make


@pytest.fixture
async def chain(local_chain: Any) -> AsyncIterator[Chain]:
    async with Chain(local_chain.rpc_url, BASE.usdc, request_timeout=5.0) as c:
        yield c


@pytest.fixture
def settler_key(local_chain: Any) -> str:
    """A settler key of its own per test (gas money only), so tests never share a nonce."""
    address, key = new_key()
    local_chain.fund(address, eth_wei=10 * ETH)
    return key


@pytest.fixture
async def settler(chain: Chain, settler_key: str) -> Settler:
    s = Settler(chain, settler_key)
    await s.start()
    return s


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SqliteLedger]:
    async with SqliteLedger(tmp_path / "ledger.db") as led:
        yield led


@pytest.fixture
async def processor(chain: Chain, settler: Settler, ledger: SqliteLedger) -> PaymentProcessor:
    p = PaymentProcessor(chain, settler, ledger)
    await p.start()
    return p


def requirement(pay_to: str, amount: int = 250_000, **kw: Any) -> Requirement:
    kw.setdefault("network", BASE)
    return Requirement(
        amount=amount,
        pay_to=pay_to,
        resource_url="http://127.0.0.1/generate",
        description="test generation",
        **kw,
    )


def authorization(
    payer: Payer, req: Requirement, *, now: int | None = None, **overrides: Any
) -> Authorization:
    now = int(time.time()) if now is None else now
    fields: dict[str, Any] = {
        "from_": payer.address,
        "to": req.pay_to,
        "value": req.amount,
        "valid_after": now - 60,
        "valid_before": now + req.max_timeout_seconds,
        "nonce": random_nonce(secrets.token_bytes),
    }
    fields.update(overrides)
    return Authorization(**fields)


def header_for(auth: Authorization, signature: bytes, req: Requirement, *, version: int = 2) -> str:
    """The X-PAYMENT (v1) / PAYMENT-SIGNATURE (v2) header value, built by hand."""
    wire_auth = {
        "from": auth.from_,
        "to": auth.to,
        "value": str(auth.value),
        "validAfter": str(auth.valid_after),
        "validBefore": str(auth.valid_before),
        "nonce": "0x" + auth.nonce.hex(),
    }
    payload = {"signature": "0x" + signature.hex(), "authorization": wire_auth}
    if version == 1:
        return b64_json(
            {"x402Version": 1, "scheme": "exact", "network": req.network.name, "payload": payload}
        )
    return b64_json(
        {
            "x402Version": 2,
            "resource": {"url": req.resource_url},
            "accepted": req.v2_dict(),
            "payload": payload,
        }
    )


def signed_header(
    payer: Payer, req: Requirement, *, version: int = 2, **overrides: Any
) -> tuple[str, Authorization]:
    auth = authorization(payer, req, **overrides)
    return header_for(
        auth, sign_authorization(payer.key, req.domain, auth), req, version=version
    ), auth

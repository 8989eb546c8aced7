"""Funded payers and pre-signed payments, made before any timed phase.

A payment here is exactly what a client sends: a v2 `PAYMENT-SIGNATURE` header for the first
requirement of the server's own `PAYMENT-REQUIRED` challenge, signed with a fresh random nonce.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from eth_account import Account

from payments.chain import encode_transfer_with_authorization
from payments.eip3009 import Authorization, TokenDomain, sign_authorization
from payments.localchain import CANONICAL_USDC, LocalChain, encode_call
from payments.wire import exact_evm_payload

USDC = 10**6
ETH = 10**18


@dataclass(frozen=True)
class Payer:
    address: str
    key: str


def new_account() -> Payer:
    account = Account.create()
    return Payer(account.address, "0x" + bytes(account.key).hex())


def fund_payers(chain: LocalChain, count: int, usdc_each: int) -> list[Payer]:
    """Mint to `count` fresh payers in ONE block (automine off while the mints queue), so the
    chain the benchmark starts on is as short as a fresh one."""
    payers = [new_account() for _ in range(count)]
    harness = chain.harness_account.address
    chain.rpc("evm_setAutomine", [False])
    try:
        for payer in payers:
            data = encode_call("mint(address,uint256)", payer.address, usdc_each)
            chain.rpc(
                "eth_sendTransaction",
                [{"from": harness, "to": CANONICAL_USDC, "data": "0x" + data.hex()}],
            )
        chain.rpc("evm_mine", [])
    finally:
        chain.rpc("evm_setAutomine", [True])
    for payer in (payers[0], payers[-1]):
        if chain.usdc_balance(payer.address) != usdc_each:
            raise RuntimeError("payer funding did not land")
    return payers


def fund_eth(chain: LocalChain, address: str, wei: int = 100 * ETH) -> None:
    chain.rpc("anvil_setBalance", [address, hex(wei)])


def _b64(value: Any) -> str:
    return base64.b64encode(json.dumps(value, separators=(",", ":")).encode()).decode()


def sign_authorization_for(
    payer: Payer, requirement: dict[str, Any], amount: int, chain_id: int, now: int
) -> tuple[Authorization, bytes]:
    auth = Authorization(
        from_=payer.address,
        to=requirement["payTo"],
        value=amount,
        valid_after=now - 60,
        valid_before=now + int(requirement["maxTimeoutSeconds"]),
        nonce=secrets.token_bytes(32),
    )
    domain = TokenDomain(
        requirement["extra"]["name"],
        requirement["extra"]["version"],
        chain_id,
        requirement["asset"],
    )
    return auth, sign_authorization(payer.key, domain, auth)


def v2_headers(
    challenge_header: str, payers: list[Payer], count: int, chain_id: int = 8453
) -> list[str]:
    """`count` PAYMENT-SIGNATURE values for the challenge, round-robin over the payers."""
    challenge = json.loads(base64.b64decode(challenge_header))
    accepted = challenge["accepts"][0]
    amount = int(accepted["amount"])
    now = int(time.time())
    headers = []
    for i in range(count):
        auth, signature = sign_authorization_for(
            payers[i % len(payers)], accepted, amount, chain_id, now
        )
        payload = exact_evm_payload(auth, signature)
        body = {"x402Version": 2, "resource": challenge["resource"], "accepted": accepted}
        headers.append(_b64({**body, "payload": payload}))
    return headers


def raw_settlement_txs(
    settler: Payer,
    payers: list[Payer],
    pay_to: str,
    amount: int,
    count: int,
    *,
    chain_id: int = 8453,
    gas_price: int,
) -> list[bytes]:
    """Signed `transferWithAuthorization` transactions with nonces 0..count-1: what the chain can
    include with no server in between (the ceiling of the settlement benchmark)."""
    requirement = {
        "payTo": pay_to,
        "maxTimeoutSeconds": 600,
        "asset": CANONICAL_USDC,
        "extra": {"name": "USD Coin", "version": "2"},
    }
    account = Account.from_key(settler.key)
    now = int(time.time())
    raws = []
    for nonce in range(count):
        auth, signature = sign_authorization_for(
            payers[nonce % len(payers)], requirement, amount, chain_id, now
        )
        tx = {
            "type": 2,
            "chainId": chain_id,
            "nonce": nonce,
            "to": CANONICAL_USDC,
            "value": 0,
            "data": encode_transfer_with_authorization(auth, signature),
            "gas": 150_000,
            "maxFeePerGas": gas_price * 2 + 1_000_000,
            "maxPriorityFeePerGas": 1_000_000,
        }
        raws.append(bytes(account.sign_transaction(tx).raw_transaction))
    return raws

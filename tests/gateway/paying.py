"""Test-side payers: sign real EIP-3009 authorizations for a 402 we received, in either version.

Used where the official client cannot express the case (a v1-only client, a payment quoted for
another body, one header replayed many times)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from payments.eip3009 import Authorization, TokenDomain, random_nonce, sign_authorization
from payments.wire import exact_evm_payload


def _sign(key: str, req: dict[str, Any], amount: int, chain_id: int) -> dict[str, Any]:
    now = int(time.time())
    auth = Authorization(
        from_=_address_of(key),
        to=req["payTo"],
        value=amount,
        valid_after=now - 60,
        valid_before=now + int(req["maxTimeoutSeconds"]),
        nonce=random_nonce(),
    )
    domain = TokenDomain(req["extra"]["name"], req["extra"]["version"], chain_id, req["asset"])
    signature = sign_authorization(key, domain, auth)
    return exact_evm_payload(auth, signature)


def _address_of(key: str) -> str:
    from eth_account import Account

    address: str = Account.from_key(key).address
    return address


def _b64(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def decode_challenge(header: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(base64.b64decode(header))
    return value


def v2_header(challenge_header: str, key: str, chain_id: int = 8453) -> str:
    """PAYMENT-SIGNATURE for the first requirement of a PAYMENT-REQUIRED header."""
    challenge = decode_challenge(challenge_header)
    accepted = challenge["accepts"][0]
    payload = _sign(key, accepted, int(accepted["amount"]), chain_id)
    return _b64(
        {
            "x402Version": 2,
            "resource": challenge["resource"],
            "accepted": accepted,
            "payload": payload,
        }
    )


def v1_header(body: dict[str, Any], key: str, chain_id: int = 8453) -> str:
    """X-PAYMENT for the first requirement of a v1 402 body."""
    req = body["accepts"][0]
    payload = _sign(key, req, int(req["maxAmountRequired"]), chain_id)
    return _b64(
        {"x402Version": 1, "scheme": req["scheme"], "network": req["network"], "payload": payload}
    )

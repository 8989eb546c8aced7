"""Hand-written ABI fragments of Circle's FiatToken (USDC) and of EIP-1271 wallets.

Only what settlement needs. Written by hand from the FiatToken v2.2 interface rather than
loaded from the test artifact: production talks to the real USDC, and the test token must
match *this* interface (tests check that), not the other way round.
"""

from __future__ import annotations

from typing import Final

from eth_typing import ABI, ABIComponent, ABIComponentIndexed, ABIEvent, ABIFunction

__all__ = [
    "ERC1271_ABI",
    "ERC1271_MAGIC_VALUE",
    "REVERT_AUTHORIZATION_EXPIRED",
    "REVERT_AUTHORIZATION_NOT_YET_VALID",
    "REVERT_AUTHORIZATION_USED",
    "REVERT_BLACKLISTED",
    "REVERT_CALLER_NOT_PAYEE",
    "REVERT_ECRECOVER_FAILED",
    "REVERT_INSUFFICIENT_BALANCE",
    "REVERT_INVALID_SIGNATURE",
    "REVERT_INVALID_SIGNATURE_LENGTH",
    "REVERT_INVALID_SIGNATURE_S",
    "REVERT_INVALID_SIGNATURE_V",
    "REVERT_PAUSED",
    "TRANSFER_EVENT_TOPIC",
    "USDC_ABI",
]


def _params(*pairs: tuple[str, str]) -> list[ABIComponent]:
    return [{"name": name, "type": type_} for name, type_ in pairs]


def _view(name: str, inputs: list[ABIComponent], output: str) -> ABIFunction:
    return {
        "type": "function",
        "name": name,
        "stateMutability": "view",
        "inputs": inputs,
        "outputs": [{"name": "", "type": output}],
    }


def _write(name: str, inputs: list[ABIComponent], outputs: list[ABIComponent]) -> ABIFunction:
    return {
        "type": "function",
        "name": name,
        "stateMutability": "nonpayable",
        "inputs": inputs,
        "outputs": outputs,
    }


def _event(name: str, *fields: tuple[str, str, bool]) -> ABIEvent:
    inputs: list[ABIComponentIndexed] = [
        {"name": n, "type": t, "indexed": indexed} for n, t, indexed in fields
    ]
    return {"type": "event", "name": name, "anonymous": False, "inputs": inputs}


_AUTHORIZATION_FIELDS: Final = (
    ("from", "address"),
    ("to", "address"),
    ("value", "uint256"),
    ("validAfter", "uint256"),
    ("validBefore", "uint256"),
    ("nonce", "bytes32"),
)

USDC_ABI: Final[ABI] = (
    _view("name", [], "string"),
    _view("version", [], "string"),
    _view("decimals", [], "uint8"),
    _view("DOMAIN_SEPARATOR", [], "bytes32"),
    _view("balanceOf", _params(("account", "address")), "uint256"),
    _view("authorizationState", _params(("authorizer", "address"), ("nonce", "bytes32")), "bool"),
    _write(
        "transfer",
        _params(("to", "address"), ("value", "uint256")),
        _params(("", "bool")),
    ),
    # EOA overload (all FiatToken v2 versions).
    _write(
        "transferWithAuthorization",
        _params(*_AUTHORIZATION_FIELDS, ("v", "uint8"), ("r", "bytes32"), ("s", "bytes32")),
        [],
    ),
    # Bytes overload (FiatToken v2.2+): r || s || v for EOAs, anything for EIP-1271 wallets.
    _write(
        "transferWithAuthorization",
        _params(*_AUTHORIZATION_FIELDS, ("signature", "bytes")),
        [],
    ),
    _event(
        "Transfer",
        ("from", "address", True),
        ("to", "address", True),
        ("value", "uint256", False),
    ),
    _event(
        "AuthorizationUsed",
        ("authorizer", "address", True),
        ("nonce", "bytes32", True),
    ),
)

ERC1271_ABI: Final[ABI] = (
    _view("isValidSignature", _params(("hash", "bytes32"), ("signature", "bytes")), "bytes4"),
)

# bytes4(keccak256("isValidSignature(bytes32,bytes)")), returned by a wallet that accepts.
ERC1271_MAGIC_VALUE: Final = bytes.fromhex("1626ba7e")

# keccak256("Transfer(address,address,uint256)")
TRANSFER_EVENT_TOPIC: Final = bytes.fromhex(
    "ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
)

# Revert strings of FiatToken v2.2 (the test token uses the same ones), for decoding simulations.
REVERT_AUTHORIZATION_NOT_YET_VALID: Final = "FiatTokenV2: authorization is not yet valid"
REVERT_AUTHORIZATION_EXPIRED: Final = "FiatTokenV2: authorization is expired"
REVERT_AUTHORIZATION_USED: Final = "FiatTokenV2: authorization is used or canceled"
REVERT_INVALID_SIGNATURE: Final = "FiatTokenV2: invalid signature"
REVERT_CALLER_NOT_PAYEE: Final = "FiatTokenV2: caller must be the payee"
REVERT_INSUFFICIENT_BALANCE: Final = "ERC20: transfer amount exceeds balance"
REVERT_INVALID_SIGNATURE_LENGTH: Final = "ECRecover: invalid signature length"
REVERT_INVALID_SIGNATURE_S: Final = "ECRecover: invalid signature 's' value"
REVERT_INVALID_SIGNATURE_V: Final = "ECRecover: invalid signature 'v' value"
REVERT_ECRECOVER_FAILED: Final = "ECRecover: invalid signature"
# Real USDC only (the test token has no blacklist and no pause).
REVERT_BLACKLISTED: Final = "Blacklistable: account is blacklisted"
REVERT_PAUSED: Final = "Pausable: paused"

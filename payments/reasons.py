"""x402 reason strings, verbatim from the specification and the official SDK.

Sources: x402 specification v2 §9 "Error Handling" (generic and exact-EVM codes) and the
official exact-EVM mechanism (`x402` PyPI package, v2.25) for the codes the spec text does not
list (insufficient balance, nonce already used, token name/version mismatch, undeployed smart
wallet, simulation failed). Where neither has a string, the name follows their
`invalid_exact_evm_...` style; those are marked "ours" below.

Decisions:
- amount mismatch uses the spec's `invalid_exact_evm_payload_authorization_value` (the SDK
  says `..._value_mismatch`); we refuse lower AND higher values with it.
- a scheme we do not offer is `unsupported_scheme` (what the official facilitator answers);
  `invalid_scheme` is kept as a constant because the spec lists it.
- "validBefore leaves too little time to settle" reuses the spec's `..._valid_before` reason;
  the `detail` text tells it apart from "already expired".
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ALL_REASONS",
    "ASSET_MISMATCH",
    "AUTHORIZATION_VALUE_MISMATCH",
    "INSUFFICIENT_BALANCE",
    "INSUFFICIENT_FUNDS",
    "INVALID_NETWORK",
    "INVALID_PAYLOAD",
    "INVALID_PAYMENT_REQUIREMENTS",
    "INVALID_SCHEME",
    "INVALID_SIGNATURE",
    "INVALID_TRANSACTION_STATE",
    "INVALID_X402_VERSION",
    "NONCE_ALREADY_USED",
    "RECIPIENT_MISMATCH",
    "SIMULATION_FAILED",
    "TOKEN_NAME_MISMATCH",
    "TOKEN_VERSION_MISMATCH",
    "TRANSACTION_FAILED",
    "TRANSFER_EVENT_MISMATCH",
    "UNDEPLOYED_SMART_WALLET",
    "UNEXPECTED_SETTLE_ERROR",
    "UNEXPECTED_VERIFY_ERROR",
    "UNSUPPORTED_SCHEME",
    "VALID_AFTER_IN_FUTURE",
    "VALID_BEFORE_EXPIRED",
]

# --- generic (spec v2 §9) -----------------------------------------------------------------
INVALID_X402_VERSION: Final = "invalid_x402_version"
UNSUPPORTED_SCHEME: Final = "unsupported_scheme"
INVALID_SCHEME: Final = "invalid_scheme"
INVALID_NETWORK: Final = "invalid_network"
INVALID_PAYLOAD: Final = "invalid_payload"
INVALID_PAYMENT_REQUIREMENTS: Final = "invalid_payment_requirements"
INSUFFICIENT_FUNDS: Final = "insufficient_funds"
INVALID_TRANSACTION_STATE: Final = "invalid_transaction_state"
UNEXPECTED_VERIFY_ERROR: Final = "unexpected_verify_error"
UNEXPECTED_SETTLE_ERROR: Final = "unexpected_settle_error"

# --- exact scheme on EVM: spec v2 §9 ------------------------------------------------------
INVALID_SIGNATURE: Final = "invalid_exact_evm_payload_signature"
RECIPIENT_MISMATCH: Final = "invalid_exact_evm_payload_recipient_mismatch"
AUTHORIZATION_VALUE_MISMATCH: Final = "invalid_exact_evm_payload_authorization_value"
VALID_AFTER_IN_FUTURE: Final = "invalid_exact_evm_payload_authorization_valid_after"
VALID_BEFORE_EXPIRED: Final = "invalid_exact_evm_payload_authorization_valid_before"

# --- exact scheme on EVM: official SDK constants -------------------------------------------
INSUFFICIENT_BALANCE: Final = "invalid_exact_evm_insufficient_balance"
NONCE_ALREADY_USED: Final = "invalid_exact_evm_nonce_already_used"
TOKEN_NAME_MISMATCH: Final = "invalid_exact_evm_token_name_mismatch"  # noqa: S105
TOKEN_VERSION_MISMATCH: Final = "invalid_exact_evm_token_version_mismatch"  # noqa: S105
UNDEPLOYED_SMART_WALLET: Final = "invalid_exact_evm_payload_undeployed_smart_wallet"
SIMULATION_FAILED: Final = "invalid_exact_evm_transaction_simulation_failed"
TRANSFER_EVENT_MISMATCH: Final = "invalid_exact_evm_transfer_event_mismatch"
TRANSACTION_FAILED: Final = "transaction_failed"

# --- ours (no spec/SDK string exists) ----------------------------------------------------
ASSET_MISMATCH: Final = "invalid_exact_evm_asset_mismatch"

ALL_REASONS: Final[frozenset[str]] = frozenset(
    {
        INVALID_X402_VERSION,
        UNSUPPORTED_SCHEME,
        INVALID_SCHEME,
        INVALID_NETWORK,
        INVALID_PAYLOAD,
        INVALID_PAYMENT_REQUIREMENTS,
        INSUFFICIENT_FUNDS,
        INVALID_TRANSACTION_STATE,
        UNEXPECTED_VERIFY_ERROR,
        UNEXPECTED_SETTLE_ERROR,
        INVALID_SIGNATURE,
        RECIPIENT_MISMATCH,
        AUTHORIZATION_VALUE_MISMATCH,
        VALID_AFTER_IN_FUTURE,
        VALID_BEFORE_EXPIRED,
        INSUFFICIENT_BALANCE,
        NONCE_ALREADY_USED,
        TOKEN_NAME_MISMATCH,
        TOKEN_VERSION_MISMATCH,
        UNDEPLOYED_SMART_WALLET,
        SIMULATION_FAILED,
        TRANSFER_EVENT_MISMATCH,
        TRANSACTION_FAILED,
        ASSET_MISMATCH,
    }
)

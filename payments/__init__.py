"""Money: the x402 wire protocol (v1 + v2), networks, EIP-712/EIP-3009, verification.

Pure modules (no I/O, no clock): errors, reasons, amounts, networks, eip3009, wire,
requirements, verify. I/O lives in chain/settler/ledger/processor (exported below them).
This package imports nothing from `gateway` or `generation`.
"""

from __future__ import annotations

from . import reasons
from .amounts import UINT256_MAX, USDC_DECIMALS, format_usdc, parse_usdc
from .eip3009 import (
    Authorization,
    TokenDomain,
    authorization_digest,
    domain_separator,
    normalize_address,
    random_nonce,
    recover_address,
    recover_signer,
    sign_authorization,
    split_signature,
)
from .errors import (
    InfrastructureError,
    InvalidAmount,
    InvalidPayment,
    PaymentError,
    SettlementFailed,
    UnknownNetworkError,
)
from .networks import BASE, BASE_SEPOLIA, LOCAL, NETWORKS, Network, get_network
from .requirements import Challenge, Discovery, Requirement, build_payment_required
from .verify import DEFAULT_SETTLE_MARGIN_S, Payment, match_requirement, verify_offline
from .wire import (
    MAX_HEADER_CHARS,
    AuthorizationWire,
    ExactEvmPayload,
    PaymentPayload,
    PaymentPayloadV1,
    PaymentPayloadV2,
    PaymentRequiredV1,
    PaymentRequiredV2,
    PaymentRequirementsV1,
    PaymentRequirementsV2,
    ResourceInfo,
    SettleResponse,
    decode_payment_header,
    decode_payment_required,
    decode_settle_response,
    encode_b64_json,
    to_authorization,
)

# --- I/O side (chain, settler, ledger, processor): other modules add their imports here ---

__all__ = [
    # pure side
    "BASE",
    "BASE_SEPOLIA",
    "DEFAULT_SETTLE_MARGIN_S",
    "LOCAL",
    "MAX_HEADER_CHARS",
    "NETWORKS",
    "UINT256_MAX",
    "USDC_DECIMALS",
    "Authorization",
    "AuthorizationWire",
    "Challenge",
    "Discovery",
    "ExactEvmPayload",
    "InfrastructureError",
    "InvalidAmount",
    "InvalidPayment",
    "Network",
    "Payment",
    "PaymentError",
    "PaymentPayload",
    "PaymentPayloadV1",
    "PaymentPayloadV2",
    "PaymentRequiredV1",
    "PaymentRequiredV2",
    "PaymentRequirementsV1",
    "PaymentRequirementsV2",
    "Requirement",
    "ResourceInfo",
    "SettleResponse",
    "SettlementFailed",
    "TokenDomain",
    "UnknownNetworkError",
    "authorization_digest",
    "build_payment_required",
    "decode_payment_header",
    "decode_payment_required",
    "decode_settle_response",
    "domain_separator",
    "encode_b64_json",
    "format_usdc",
    "get_network",
    "match_requirement",
    "normalize_address",
    "parse_usdc",
    "random_nonce",
    "reasons",
    "recover_address",
    "recover_signer",
    "sign_authorization",
    "split_signature",
    "to_authorization",
    "verify_offline",
    # --- I/O side: chain / settler / ledger / processor exports go below this line ---
]

"""x402 wire format (v1 and v2): pydantic models, strict header codecs, wire -> typed values.

Models share one base with camelCase aliases and strict types (a number where the spec says
string, or a bool where it says number, is refused). Messages a *client* writes
(`PaymentPayloadV1/V2`, `ExactEvmPayload`, `AuthorizationWire`, `PaymentRequirementsV2` as
`accepted`) forbid unknown fields; messages a *server* writes (`PaymentRequiredV1/V2`,
`SettleResponse`, `ResourceInfo`) ignore unknown fields so our client side stays tolerant of
other servers (the bazaar spec already adds `serviceName`, `tags`, `iconUrl` to `resource`).

Header decoding (`decode_payment_header`) is bounded and strict, and every failure is an
`InvalidPayment` with an x402 reason:
- at most `MAX_HEADER_CHARS` (16 KiB) of base64. Not 8 KiB: the official clients echo the
  server's `extensions` (bazaar input/output schema) inside PAYMENT-SIGNATURE.
- base64: the standard alphabet with correct `=` padding (what every official client sends),
  or the URL-safe alphabet (RFC 4648 §5, padding optional) because it is common in headers;
  no whitespace, no mixing of the two alphabets.
- UTF-8 JSON object; duplicate keys, NaN/Infinity and nesting deeper than `MAX_JSON_DEPTH`
  are refused (duplicate keys are a classic parser-disagreement smuggling vector).
- `x402Version` must be the integer 1 or 2 (else `invalid_x402_version`).

`to_authorization` turns the authorization strings into an `Authorization`: uint256 fields as
decimal strings (or 0x-hex, which the exact-EVM spec also allows), no sign, no whitespace, no
overflow; `nonce` exactly 0x + 64 hex; addresses per `eip3009.normalize_address`; the
signature any non-empty even-length hex up to 4 KiB (65-byte ECDSA, or longer EIP-1271 /
ERC-6492 blobs for contract wallets -- ecrecover itself only takes 65 bytes).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from . import reasons
from .eip3009 import Authorization, normalize_address
from .errors import InvalidPayment

__all__ = [
    "MAX_HEADER_CHARS",
    "MAX_JSON_DEPTH",
    "MAX_SIGNATURE_BYTES",
    "AuthorizationWire",
    "ExactEvmPayload",
    "PaymentPayload",
    "PaymentPayloadV1",
    "PaymentPayloadV2",
    "PaymentRequiredV1",
    "PaymentRequiredV2",
    "PaymentRequirementsV1",
    "PaymentRequirementsV2",
    "ResourceInfo",
    "SettleResponse",
    "b64_json",
    "decode_b64_json",
    "decode_payment_header",
    "decode_payment_required",
    "decode_settle_response",
    "dumps_compact",
    "encode_b64_json",
    "exact_evm_payload",
    "json_nesting_exceeds",
    "parse_uint256",
    "to_authorization",
]

MAX_HEADER_CHARS: Final = 16 * 1024
MAX_JSON_DEPTH: Final = 32
MAX_SIGNATURE_BYTES: Final = 4096
_UINT256_MAX: Final = 2**256 - 1

_UINT_DEC: Final = re.compile(r"[0-9]{1,78}")
_UINT_HEX: Final = re.compile(r"0[xX][0-9a-fA-F]{1,64}")
_NONCE: Final = re.compile(r"0[xX][0-9a-fA-F]{64}")
_HEX_BYTES: Final = re.compile(r"0[xX](?:[0-9a-fA-F]{2})+")
_B64_STD: Final = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_B64_URL: Final = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_URL_TO_STD: Final = str.maketrans("-_", "+/")


# --------------------------------------------------------------------------- models


class _Wire(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        frozen=True,
    )


class _Lenient(_Wire):
    model_config = ConfigDict(extra="ignore")


class ResourceInfo(_Lenient):
    """v2 `resource`: what is being paid for (echoed by clients; informational only)."""

    url: str
    description: str | None = None
    mime_type: str | None = None
    service_name: str | None = None
    tags: list[str] | None = None
    icon_url: str | None = None


class PaymentRequirementsV1(_Lenient):
    """One entry of the v1 `accepts` list (amount is `maxAmountRequired`, network a name)."""

    scheme: str
    network: str
    max_amount_required: str
    resource: str
    description: str = ""
    mime_type: str = ""
    output_schema: dict[str, Any] | None = None
    pay_to: str
    max_timeout_seconds: int
    asset: str
    extra: dict[str, Any] | None = None


class PaymentRequirementsV2(_Wire):
    """One entry of the v2 `accepts` list, and the `accepted` echo in a v2 payment."""

    scheme: str
    network: str
    amount: str
    asset: str
    pay_to: str
    max_timeout_seconds: int
    extra: dict[str, Any] | None = None


class PaymentRequiredV1(_Lenient):
    """v1 402 challenge: the JSON response body."""

    x402_version: Literal[1] = 1
    error: str | None = None
    accepts: list[PaymentRequirementsV1]


class PaymentRequiredV2(_Lenient):
    """v2 402 challenge: base64 JSON in the PAYMENT-REQUIRED header."""

    x402_version: Literal[2] = 2
    error: str | None = None
    resource: ResourceInfo
    accepts: list[PaymentRequirementsV2]
    extensions: dict[str, Any] | None = None


class AuthorizationWire(_Wire):
    """EIP-3009 authorization as strings, exactly as on the wire."""

    from_: str = Field(alias="from")
    to: str
    value: str
    valid_after: str
    valid_before: str
    nonce: str


class ExactEvmPayload(_Wire):
    """`payload` of the exact scheme on EVM."""

    signature: str
    authorization: AuthorizationWire


class PaymentPayloadV1(_Wire):
    """v1 X-PAYMENT header content."""

    x402_version: Literal[1] = 1
    scheme: str
    network: str
    payload: ExactEvmPayload


class PaymentPayloadV2(_Wire):
    """v2 PAYMENT-SIGNATURE header content."""

    x402_version: Literal[2] = 2
    resource: ResourceInfo | None = None
    accepted: PaymentRequirementsV2
    payload: ExactEvmPayload
    extensions: dict[str, Any] | None = None


PaymentPayload = PaymentPayloadV1 | PaymentPayloadV2


class SettleResponse(_Lenient):
    """PAYMENT-RESPONSE / X-PAYMENT-RESPONSE content."""

    success: bool
    error_reason: str | None = None
    transaction: str
    network: str
    payer: str | None = None


# --------------------------------------------------------------------------- codecs


def dumps_compact(obj: Any) -> str:
    """Compact JSON (no spaces), the form every header and cached body uses."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def b64_json(obj: Any) -> str:
    """Standard base64 (with padding) of compact UTF-8 JSON."""
    return base64.b64encode(dumps_compact(obj).encode("utf-8")).decode("ascii")


def encode_b64_json(model: BaseModel) -> str:
    """Header value for a wire model (aliases, None fields left out)."""
    return b64_json(model.model_dump(mode="json", by_alias=True, exclude_none=True))


def _invalid(detail: str, reason: str = reasons.INVALID_PAYLOAD) -> InvalidPayment:
    return InvalidPayment(reason, detail)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in JSON object")
    return obj


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_JSON_NESTING_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def json_nesting_exceeds(raw: bytes, limit: int, *, max_brackets: int = 20_000) -> bool:
    """True if `raw` JSON nests deeper than `limit` (or opens more than `max_brackets`).

    Checked BEFORE `json.loads`: the C parser recurses per level, and with the interpreter's
    recursion limit raised (py_ecc sets it to 100000 at import) a deep enough document
    overflows the C stack and kills the process instead of raising RecursionError.
    """
    opens = raw.count(b"[") + raw.count(b"{")
    if opens <= limit:
        return False
    if opens > max_brackets:
        return True
    depth = 0
    for match in _JSON_NESTING_TOKENS.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
    return False


def _check_depth(root: Any, limit: int) -> None:
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            raise _invalid(f"JSON nested deeper than {limit} levels")
        stack.extend((child, depth + 1) for child in children)


def _b64decode(value: str) -> bytes:
    if _B64_STD.fullmatch(value) is not None:
        text = value
        if len(text) % 4 and not any(ch in text for ch in "+/="):
            text += "=" * (-len(text) % 4)  # URL-safe without padding, no alphabet-specific chars
    elif _B64_URL.fullmatch(value) is not None:
        text = value.translate(_URL_TO_STD)
        if "=" not in text:
            text += "=" * (-len(text) % 4)
    else:
        raise _invalid("header is not base64 (standard or URL-safe alphabet)")
    if len(text) % 4:
        raise _invalid("base64 has a wrong length or padding")
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        raise _invalid("base64 has a wrong length or padding") from None


def decode_b64_json(value: str, *, max_chars: int = MAX_HEADER_CHARS) -> Any:
    """Bounded, strict base64 -> UTF-8 -> JSON. Raises InvalidPayment(invalid_payload)."""
    if not isinstance(value, str):
        raise _invalid("header must be a string")
    if not value:
        raise _invalid("header is empty")
    if len(value) > max_chars:
        raise _invalid(f"header longer than {max_chars} characters")
    raw = _b64decode(value)
    if json_nesting_exceeds(raw, MAX_JSON_DEPTH):
        raise _invalid(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid("decoded header is not UTF-8") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except RecursionError:
        raise _invalid(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise _invalid(f"decoded header is not valid JSON ({exc.__class__.__name__})") from None
    _check_depth(data, MAX_JSON_DEPTH)
    return data


def _validation_detail(exc: ValidationError) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "payload"
    extra = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{extra}"


def decode_payment_header(
    value: str, *, max_chars: int = MAX_HEADER_CHARS, version: Literal[1, 2] | None = None
) -> PaymentPayloadV1 | PaymentPayloadV2:
    """Decode X-PAYMENT / PAYMENT-SIGNATURE. `version` pins what the header name implies."""
    data = decode_b64_json(value, max_chars=max_chars)
    if not isinstance(data, dict):
        raise _invalid("payment must be a JSON object")
    if "x402Version" not in data:
        raise _invalid("x402Version is missing")
    found = data["x402Version"]
    if type(found) is not int or found not in (1, 2):
        raise _invalid("x402Version must be 1 or 2", reasons.INVALID_X402_VERSION)
    if version is not None and found != version:
        raise _invalid(
            f"this header carries x402 v{version} payments, got v{found}",
            reasons.INVALID_X402_VERSION,
        )
    model: type[PaymentPayloadV1 | PaymentPayloadV2]
    model = PaymentPayloadV1 if found == 1 else PaymentPayloadV2
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _invalid(_validation_detail(exc)) from None


def decode_payment_required(value: str, *, max_chars: int = 64 * 1024) -> PaymentRequiredV2:
    """Client side: decode a PAYMENT-REQUIRED header (raises InvalidPayment if malformed)."""
    data = decode_b64_json(value, max_chars=max_chars)
    try:
        return PaymentRequiredV2.model_validate(data)
    except ValidationError as exc:
        raise _invalid(_validation_detail(exc), reasons.INVALID_PAYMENT_REQUIREMENTS) from None


def decode_settle_response(value: str, *, max_chars: int = MAX_HEADER_CHARS) -> SettleResponse:
    """Client side: decode a PAYMENT-RESPONSE / X-PAYMENT-RESPONSE header."""
    data = decode_b64_json(value, max_chars=max_chars)
    try:
        return SettleResponse.model_validate(data)
    except ValidationError as exc:
        raise _invalid(_validation_detail(exc)) from None


# --------------------------------------------------------------------------- wire -> typed


def parse_uint256(text: str, field: str) -> int:
    """Decimal (or 0x-hex) string -> int in [0, 2**256); InvalidPayment otherwise."""
    if _UINT_DEC.fullmatch(text) is not None:
        number = int(text, 10)
    elif _UINT_HEX.fullmatch(text) is not None:
        number = int(text[2:], 16)
    else:
        raise _invalid(f"{field} must be a non-negative integer string")
    if number > _UINT256_MAX:
        raise _invalid(f"{field} overflows uint256")
    return number


def _address(text: str, field: str) -> str:
    try:
        return normalize_address(text)
    except ValueError as exc:
        raise _invalid(f"{field} is not a valid address: {exc}") from None


def exact_evm_payload(auth: Authorization, signature: bytes) -> dict[str, Any]:
    """The wire `payload` of the exact EVM scheme (the inverse of `to_authorization`)."""
    return {
        "signature": "0x" + signature.hex(),
        "authorization": {
            "from": auth.from_,
            "to": auth.to,
            "value": str(auth.value),
            "validAfter": str(auth.valid_after),
            "validBefore": str(auth.valid_before),
            "nonce": "0x" + auth.nonce.hex(),
        },
    }


def to_authorization(payload: ExactEvmPayload) -> tuple[Authorization, bytes]:
    """Typed `Authorization` and raw signature bytes from the wire payload."""
    wire = payload.authorization
    if _NONCE.fullmatch(wire.nonce) is None:
        raise _invalid("authorization.nonce must be 0x followed by exactly 64 hex digits")
    sig = payload.signature
    if _HEX_BYTES.fullmatch(sig) is None:
        raise _invalid("signature must be 0x-prefixed hex bytes")
    if len(sig) > 2 + 2 * MAX_SIGNATURE_BYTES:
        raise _invalid(f"signature longer than {MAX_SIGNATURE_BYTES} bytes")
    auth = Authorization(
        from_=_address(wire.from_, "authorization.from"),
        to=_address(wire.to, "authorization.to"),
        value=parse_uint256(wire.value, "authorization.value"),
        valid_after=parse_uint256(wire.valid_after, "authorization.validAfter"),
        valid_before=parse_uint256(wire.valid_before, "authorization.validBefore"),
        nonce=bytes.fromhex(wire.nonce[2:]),
    )
    return auth, bytes.fromhex(sig[2:])

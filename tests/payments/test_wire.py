"""Wire codecs: strict bounded header decoding and wire -> typed values, driven by vectors."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from payments import reasons
from payments.errors import InvalidPayment
from payments.networks import BASE, BASE_SEPOLIA, get_network
from payments.requirements import Discovery, Requirement, build_payment_required
from payments.wire import (
    MAX_HEADER_CHARS,
    PaymentPayloadV1,
    PaymentPayloadV2,
    PaymentRequiredV1,
    SettleResponse,
    decode_b64_json,
    decode_payment_header,
    decode_payment_required,
    decode_settle_response,
    dumps_compact,
    encode_b64_json,
    parse_uint256,
    to_authorization,
)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "payment_headers.json").read_text())
BASES = {"v1": VECTORS["base_v1"], "v2": VECTORS["base_v2"]}


def _materialise(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("NEST:"):
        depth = int(value[5:])
        nested: Any = []
        for _ in range(depth - 1):
            nested = [nested]
        return nested
    if isinstance(value, str) and value.startswith("PAD:"):
        return "x" * int(value[4:])
    return value


def _walk(obj: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    *parents, last = path.split(".")
    for key in parents:
        obj = obj.setdefault(key, {})
    return obj, last


def _header(vec: dict[str, Any]) -> str:
    if "raw" in vec:
        return str(vec["raw"])
    if "bytes_hex" in vec:
        return base64.b64encode(bytes.fromhex(vec["bytes_hex"])).decode()
    if "text" in vec:
        text = vec["text"]
        if text.startswith("NEST:"):
            depth = int(text[5:])
            text = "[" * depth + "]" * depth
        return base64.b64encode(text.encode()).decode()
    data = copy.deepcopy(BASES[vec["base"]])
    for path, value in vec.get("set", {}).items():
        parent, key = _walk(data, path)
        parent[key] = _materialise(value)
    for path in vec.get("delete", []):
        parent, key = _walk(data, path)
        del parent[key]
    raw = json.dumps(data).encode()
    encoding = vec.get("encoding", "standard")
    if encoding == "urlsafe":
        return base64.urlsafe_b64encode(raw).decode()
    if encoding == "urlsafe-nopad":
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize("vec", VECTORS["valid"], ids=lambda v: v["name"])
def test_valid_headers_decode(vec: dict[str, Any]) -> None:
    payload = decode_payment_header(_header(vec))
    expected_type = PaymentPayloadV2 if vec["base"] == "v2" else PaymentPayloadV1
    assert type(payload) is expected_type
    auth, signature = to_authorization(payload.payload)
    base_auth = BASES["v1"]["payload"]["authorization"]
    assert auth.from_ == base_auth["from"]  # normalised back to EIP-55 whatever the case sent
    assert auth.to == base_auth["to"]
    assert auth.value == 10000
    assert auth.nonce == bytes.fromhex(base_auth["nonce"][2:])
    assert len(signature) in (65, 300)


def test_urlsafe_header_only_differs_in_alphabet() -> None:
    # A payload whose base64 contains '+' or '/' in the standard alphabet.
    data = {"x402Version": 2, "blob": "\xfb\xff\xfe??>>"}
    std = base64.b64encode(json.dumps(data).encode()).decode()
    url = base64.urlsafe_b64encode(json.dumps(data).encode()).decode()
    assert std != url
    assert decode_b64_json(std) == decode_b64_json(url) == data


@pytest.mark.parametrize("vec", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_headers_are_refused_with_reason(vec: dict[str, Any]) -> None:
    header = _header(vec)
    with pytest.raises(InvalidPayment) as caught:
        payload = decode_payment_header(header)
        to_authorization(payload.payload)
    assert caught.value.reason == vec["reason"]
    assert caught.value.detail
    # A reason's detail never echoes the signature (or the header) back.
    assert BASES["v1"]["payload"]["signature"][2:] not in caught.value.detail


def test_oversize_vector_is_really_over_the_limit() -> None:
    (vec,) = [v for v in VECTORS["invalid"] if v["name"] == "oversize-header"]
    assert len(_header(vec)) > MAX_HEADER_CHARS


def test_header_size_limit_is_configurable() -> None:
    header = _header({"base": "v1"})
    assert decode_payment_header(header, max_chars=len(header))
    with pytest.raises(InvalidPayment, match="longer than"):
        decode_payment_header(header, max_chars=len(header) - 1)


def test_header_name_pins_the_version() -> None:
    v1 = _header({"base": "v1"})
    v2 = _header({"base": "v2"})
    assert isinstance(decode_payment_header(v1, version=1), PaymentPayloadV1)
    assert isinstance(decode_payment_header(v2, version=2), PaymentPayloadV2)
    for header, wrong in ((v1, 2), (v2, 1)):
        with pytest.raises(InvalidPayment) as caught:
            decode_payment_header(header, version=wrong)  # type: ignore[arg-type]
        assert caught.value.reason == reasons.INVALID_X402_VERSION


def test_non_string_header_is_invalid_payload() -> None:
    with pytest.raises(InvalidPayment) as caught:
        decode_payment_header(1234)  # type: ignore[arg-type]
    assert caught.value.reason == reasons.INVALID_PAYLOAD


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("10000", 10000),
        ("007", 7),
        ("0x2710", 10000),
        ("0XFF", 255),
        (str(2**256 - 1), 2**256 - 1),
        ("0x" + "f" * 64, 2**256 - 1),
    ],
)
def test_parse_uint256_accepts(text: str, expected: int) -> None:
    assert parse_uint256(text, "value") == expected


@pytest.mark.parametrize(
    "text",
    ["", "-1", "+1", " 1", "1 ", "1_000", "1.0", "1e3", "0x", "0x-1", str(2**256), "٣", "0b101"],
)
def test_parse_uint256_refuses(text: str) -> None:
    with pytest.raises(InvalidPayment) as caught:
        parse_uint256(text, "value")
    assert caught.value.reason == reasons.INVALID_PAYLOAD


def test_settle_response_round_trip() -> None:
    response = SettleResponse(
        success=True,
        transaction="0x" + "12" * 32,
        network="eip155:8453",
        payer="0x5D919726D5943F1F932fE80B9C98dA6b72D82b25",
    )
    header = encode_b64_json(response)
    raw = json.loads(base64.b64decode(header))
    assert raw == {
        "success": True,
        "transaction": "0x" + "12" * 32,
        "network": "eip155:8453",
        "payer": "0x5D919726D5943F1F932fE80B9C98dA6b72D82b25",
    }  # camelCase, no null errorReason
    assert decode_settle_response(header) == response
    failed = SettleResponse(
        success=False, error_reason=reasons.NONCE_ALREADY_USED, transaction="", network="base"
    )
    assert json.loads(base64.b64decode(encode_b64_json(failed)))["errorReason"] == (
        "invalid_exact_evm_nonce_already_used"
    )


def test_encoded_payload_decodes_to_equal_model() -> None:
    payload = decode_payment_header(_header({"base": "v2"}))
    assert decode_payment_header(encode_b64_json(payload)) == payload


# --------------------------------------------------------------------------- 402 challenge

PROMPT_SCHEMA = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string", "description": "What to generate", "maxLength": 2000},
        "seconds": {"type": "integer", "minimum": 1, "maximum": 20},
    },
    "required": ["prompt"],
}
DISCOVERY = Discovery(
    input_schema=PROMPT_SCHEMA,
    input_example={"prompt": "a cat", "seconds": 4},
    output_example={"taskId": "t_123"},
)
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"


def _requirement(**changes: Any) -> Requirement:
    fields: dict[str, Any] = {
        "network": BASE,
        "amount": 250_000,
        "pay_to": PAY_TO.lower(),
        "resource_url": "https://gw.example/v1/videos",
        "description": "Generate a video",
        "discovery": DISCOVERY,
    }
    fields.update(changes)
    return Requirement(**fields)


def test_challenge_v2_header() -> None:
    challenge = build_payment_required([_requirement()], "PAYMENT-SIGNATURE header is required")
    v2 = json.loads(base64.b64decode(challenge.header, validate=True))
    assert v2["x402Version"] == 2
    assert v2["error"] == "PAYMENT-SIGNATURE header is required"
    assert v2["resource"] == {
        "url": "https://gw.example/v1/videos",
        "description": "Generate a video",
        "mimeType": "application/json",
    }
    assert v2["accepts"] == [
        {
            "scheme": "exact",
            "network": "eip155:8453",
            "amount": "250000",
            "asset": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
            "payTo": PAY_TO,  # checksummed although given in lower case
            "maxTimeoutSeconds": 60,
            "extra": {"name": "USD Coin", "version": "2"},
        }
    ]
    bazaar = v2["extensions"]["bazaar"]
    assert bazaar["info"] == {
        "input": {
            "type": "http",
            "method": "POST",
            "bodyType": "json",
            "body": {"prompt": "a cat", "seconds": 4},
        },
        "output": {"type": "json", "example": {"taskId": "t_123"}},
    }
    schema = bazaar["schema"]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == ["input"]
    input_schema = schema["properties"]["input"]
    assert input_schema["properties"]["body"] == PROMPT_SCHEMA
    assert input_schema["required"] == ["type", "method", "bodyType", "body"]
    assert input_schema["additionalProperties"] is False
    assert decode_payment_required(challenge.header).accepts[0].amount == "250000"


def test_challenge_v1_body() -> None:
    challenge = build_payment_required([_requirement()], "X-PAYMENT header is required")
    v1 = challenge.body_json()
    assert v1["x402Version"] == 1
    assert v1["error"] == "X-PAYMENT header is required"
    (entry,) = v1["accepts"]
    assert entry == {
        "scheme": "exact",
        "network": "base",
        "maxAmountRequired": "250000",
        "resource": "https://gw.example/v1/videos",
        "description": "Generate a video",
        "mimeType": "application/json",
        "outputSchema": {
            "input": {
                "type": "http",
                "method": "POST",
                "discoverable": True,
                "bodyType": "json",
                "bodyFields": {
                    "prompt": {
                        "type": "string",
                        "description": "What to generate",
                        "maxLength": 2000,
                        "required": True,
                    },
                    "seconds": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": 20,
                        "required": False,
                    },
                },
            },
            "output": {"taskId": "t_123"},
        },
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        "asset": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
        "extra": {"name": "USD Coin", "version": "2"},
    }
    assert PaymentRequiredV1.model_validate(v1).accepts[0].max_amount_required == "250000"
    assert challenge.body == dumps_compact(v1).encode()  # compact JSON, ready to send


def test_challenge_without_discovery_and_with_two_networks() -> None:
    base = _requirement(discovery=None)
    sepolia = _requirement(network=BASE_SEPOLIA, discovery=None, amount=1)
    challenge = build_payment_required([base, sepolia])
    v2 = json.loads(base64.b64decode(challenge.header))
    assert v2["extensions"] == {}
    assert [a["network"] for a in v2["accepts"]] == ["eip155:8453", "eip155:84532"]
    assert v2["accepts"][1]["extra"] == {"name": "USDC", "version": "2"}
    v1 = challenge.body_json()
    assert [a["network"] for a in v1["accepts"]] == ["base", "base-sepolia"]
    assert "outputSchema" not in v1["accepts"][0]


def test_challenge_is_memoised_by_content() -> None:
    first = build_payment_required([_requirement()], "e")
    again = build_payment_required([_requirement(discovery=Discovery(**_discovery_kwargs()))], "e")
    assert again is first  # equal content -> same cached object
    assert build_payment_required([_requirement(amount=250_001)], "e") != first
    assert build_payment_required([_requirement()], "other error") != first


def _discovery_kwargs() -> dict[str, Any]:
    return {
        "input_schema": json.loads(json.dumps(PROMPT_SCHEMA)),
        "input_example": {"seconds": 4, "prompt": "a cat"},
        "output_example": {"taskId": "t_123"},
    }


def test_challenge_is_not_changed_by_later_mutation_of_inputs() -> None:
    schema = json.loads(json.dumps(PROMPT_SCHEMA))
    discovery = Discovery(input_schema=schema, input_example={"prompt": "x"})
    v1_before = discovery.v1_output_schema()
    schema["properties"]["prompt"]["type"] = "integer"  # the caller mutates its own dict
    assert discovery.v1_output_schema() == v1_before
    assert discovery == Discovery(input_schema=PROMPT_SCHEMA, input_example={"prompt": "x"})
    bazaar = discovery.bazaar_extension()
    bazaar["info"]["input"]["body"]["prompt"] = "mutated"
    assert discovery.bazaar_extension()["info"]["input"]["body"] == {"prompt": "x"}


def test_get_discovery_uses_query_params() -> None:
    discovery = Discovery(
        method="GET",
        input_schema={"type": "object", "properties": {"q": {"type": "string"}}},
        input_example={"q": "cats"},
    )
    assert discovery.bazaar_extension()["info"]["input"] == {
        "type": "http",
        "method": "GET",
        "queryParams": {"q": "cats"},
    }
    assert discovery.v1_output_schema()["input"]["queryParams"] == {"q": "string"}


def test_challenge_refuses_inconsistent_offers() -> None:
    with pytest.raises(ValueError):
        build_payment_required([])
    with pytest.raises(ValueError, match="same resource"):
        build_payment_required([_requirement(), _requirement(resource_url="https://x/other")])


@pytest.mark.parametrize(
    "changes",
    [
        {"amount": 0},
        {"amount": -1},
        {"amount": 2**256},
        {"amount": True},
        {"max_timeout_seconds": 0},
        {"resource_url": ""},
        {"pay_to": "0xnope"},
        {"asset": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913".replace("fCD", "fcD")},
    ],
)
def test_requirement_validates(changes: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        _requirement(**changes)


def test_requirement_defaults_come_from_the_network() -> None:
    req = _requirement(network=BASE_SEPOLIA)
    assert req.asset == BASE_SEPOLIA.usdc
    assert req.extra == {"name": "USDC", "version": "2"}
    assert req.domain == BASE_SEPOLIA.token_domain
    assert get_network("eip155:84532") is BASE_SEPOLIA
    assert get_network("local") is get_network("base") is BASE
    with pytest.raises(KeyError):
        get_network("eip155:1")

"""Property tests: every wire decoder, fed anything, either returns a typed value or raises
`InvalidPayment` with an x402 reason. No other exception, ever (a stray ValueError or
RecursionError in a decoder is a 500 at the gateway)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from payments import reasons
from payments.eip3009 import Authorization
from payments.errors import InvalidPayment
from payments.wire import (
    MAX_JSON_DEPTH,
    AuthorizationWire,
    ExactEvmPayload,
    PaymentPayloadV1,
    PaymentPayloadV2,
    PaymentRequiredV2,
    SettleResponse,
    decode_payment_header,
    decode_payment_required,
    decode_settle_response,
    to_authorization,
)
from tests.reliability.facts import Recorder, results_path

EXAMPLES = 400
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,  # the same inputs every run: a failure reproduces, CI stays stable
)

VALID_AUTH = {
    "from": "0x857b06519E91e3A54538791bDbb0E22373e36b66",
    "to": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
    "value": "10000",
    "validAfter": "1740672089",
    "validBefore": "1740672154",
    "nonce": "0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480",
}
VALID_SIG = "0x" + "2d" * 32 + "3e" * 32 + "1b"
VALID_V2 = {
    "x402Version": 2,
    "resource": {"url": "https://api.example.com/generation/create"},
    "accepted": {
        "scheme": "exact",
        "network": "eip155:8453",
        "amount": "10000",
        "asset": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
        "payTo": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USD Coin", "version": "2"},
    },
    "payload": {"signature": VALID_SIG, "authorization": VALID_AUTH},
}
VALID_V1 = {
    "x402Version": 1,
    "scheme": "exact",
    "network": "base",
    "payload": {"signature": VALID_SIG, "authorization": VALID_AUTH},
}
VALID_REQUIRED = {
    "x402Version": 2,
    "error": "payment required",
    "resource": {"url": "https://api.example.com/generation/create"},
    "accepts": [VALID_V2["accepted"]],
}
VALID_SETTLE = {
    "success": True,
    "transaction": "0x" + "ab" * 32,
    "network": "eip155:8453",
    "payer": VALID_AUTH["from"],
}

# --------------------------------------------------------------------------- strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4)
    ),
    max_leaves=20,
)


def b64(raw: bytes, *, urlsafe: bool = False, strip: bool = False) -> str:
    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(raw).decode()
    return text.rstrip("=") if strip else text


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _replace(node: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(node, dict):
        return {**node, head: _replace(node[head], rest, value)}
    copy = list(node)
    copy[head] = _replace(copy[head], rest, value)
    return copy


tricky_strings = st.sampled_from(
    [
        "",
        "-1",
        "+1",
        " 1",
        "1 ",
        "0x",
        "0x" + "f" * 65,
        str(2**256),
        str(2**256 - 1),
        "1e6",
        "1.0",
        "٣",  # a non-ASCII digit: int() would take it
        "0" * 100,
        "0x" + "0" * 63,
        "0X" + "A" * 64,
        "0x857b06519e91e3a54538791bdbb0e22373e36b66",  # lower-case address
        "0x857B06519E91E3A54538791BDBB0E22373E36B66",  # upper-case address
        "0x857b06519E91e3A54538791bDbb0E22373e36b67",  # bad checksum
        "\x00",
        "\ud800",
    ]
)


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any]) -> Any:
    """A valid message with one node replaced, removed or an extra key added."""
    paths = list(_paths(valid))
    path = draw(st.sampled_from(paths))
    action = draw(st.sampled_from(["replace", "tricky", "drop", "extra"]))
    if action == "replace":
        return _replace(valid, path, draw(json_values))
    if action == "tricky":
        return _replace(valid, path, draw(tricky_strings))
    if action == "drop" and path:
        parent_path, key = path[:-1], path[-1]
        parent: Any = valid
        for part in parent_path:
            parent = parent[part]
        if isinstance(parent, dict):
            return _replace(valid, parent_path, {k: v for k, v in parent.items() if k != key})
        return valid
    target: Any = valid
    for part in path:
        target = target[part]
    if isinstance(target, dict):
        return _replace(valid, path, {**target, draw(st.text(max_size=8)): draw(json_values)})
    return valid


def headers_for(valid: dict[str, Any]) -> st.SearchStrategy[str]:
    encoded = st.builds(
        lambda raw, urlsafe, strip: b64(raw, urlsafe=urlsafe, strip=strip),
        st.binary(max_size=300)
        | json_values.map(lambda v: json.dumps(v).encode())
        | mutated(valid).map(lambda v: json.dumps(v).encode())
        | st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
        st.booleans(),
        st.booleans(),
    )
    return st.text(max_size=200) | encoded


def _nest(depth: int) -> str:
    inner: Any = {}
    for _ in range(depth):
        inner = {"a": inner}
    return b64(json.dumps(inner).encode())


# --------------------------------------------------------------------------- the properties

COUNTS: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _record_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    COUNTS.clear()
    yield
    facts = Recorder(results_path(), request.node.nodeid)
    for name, count in sorted(COUNTS.items()):
        facts.record("inputs", suite="decoder properties", target=name, count=count, crashes=0)


def _only_invalid_payment(name: str, decode: Callable[[str], Any], value: str) -> Any:
    COUNTS[name] = COUNTS.get(name, 0) + 1
    try:
        return decode(value)
    except InvalidPayment as exc:
        assert exc.reason in reasons.ALL_REASONS, exc.reason
        assert isinstance(exc.detail, str) and exc.detail
        return None


@PROPERTY
@given(headers_for(VALID_V2) | headers_for(VALID_V1))
def test_decode_payment_header_raises_only_invalid_payment(value: str) -> None:
    out = _only_invalid_payment("decode_payment_header", decode_payment_header, value)
    assert out is None or isinstance(out, PaymentPayloadV1 | PaymentPayloadV2)
    if out is not None:  # a decoded header also survives the typed conversion
        _only_invalid_payment("to_authorization", lambda _: to_authorization(out.payload), "")


@PROPERTY
@given(headers_for(VALID_REQUIRED))
def test_decode_payment_required_raises_only_invalid_payment(value: str) -> None:
    out = _only_invalid_payment("decode_payment_required", decode_payment_required, value)
    assert out is None or isinstance(out, PaymentRequiredV2)


@PROPERTY
@given(headers_for(VALID_SETTLE))
def test_decode_settle_response_raises_only_invalid_payment(value: str) -> None:
    out = _only_invalid_payment("decode_settle_response", decode_settle_response, value)
    assert out is None or isinstance(out, SettleResponse)


field_text = (
    st.text(max_size=90)
    | tricky_strings
    | st.integers(min_value=0, max_value=2**270).map(str)
    | st.integers(min_value=0, max_value=2**270).map(hex)
    | st.binary(max_size=40).map(lambda b: "0x" + b.hex())
    | st.binary(min_size=32, max_size=32).map(lambda b: "0x" + b.hex())
)


@PROPERTY
@given(
    st.fixed_dictionaries(
        {
            "from": field_text,
            "to": field_text,
            "value": field_text,
            "validAfter": field_text,
            "validBefore": field_text,
            "nonce": field_text,
        },
    ),
    field_text | st.binary(max_size=5000).map(lambda b: "0x" + b.hex()),
)
def test_to_authorization_raises_only_invalid_payment(
    fields: dict[str, str], signature: str
) -> None:
    payload = ExactEvmPayload(
        signature=signature, authorization=AuthorizationWire.model_validate(fields)
    )
    out = _only_invalid_payment("to_authorization", lambda _: to_authorization(payload), "")
    if out is not None:
        auth, sig = out
        assert isinstance(auth, Authorization)
        assert len(auth.nonce) == 32
        for number in (auth.value, auth.valid_after, auth.valid_before):
            assert 0 <= number < 2**256
        assert 1 <= len(sig) <= 4096


def test_valid_messages_round_trip() -> None:
    for message, decode in (
        (VALID_V2, decode_payment_header),
        (VALID_V1, decode_payment_header),
        (VALID_REQUIRED, decode_payment_required),
        (VALID_SETTLE, decode_settle_response),
    ):
        decoded = decode(b64(json.dumps(message).encode()))
        assert decoded.model_dump(mode="json", by_alias=True, exclude_none=True) == message


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 200, 5000])
def test_deep_nesting_is_invalid_payload(depth: int) -> None:
    for decode in (decode_payment_header, decode_payment_required, decode_settle_response):
        with pytest.raises(InvalidPayment) as caught:
            decode(_nest(depth))
        assert caught.value.reason == reasons.INVALID_PAYLOAD

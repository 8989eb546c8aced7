"""A corpus of malformed and adversarial payment headers sent to the real gateway on Anvil.

Every one must get a 4xx that says why (402 with an x402 reason for payment faults), never a
5xx; the gateway stays healthy after each; no money moves. The payer holds no USDC, so a
header whose signature is *valid* is refused by the on-chain simulation
(`insufficient_balance`): that proves the signature checks let exactly the right variants
through (v in {0,1} == {27,28}), and nothing in the corpus can ever settle.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from payments import reasons
from payments.eip3009 import SECP256K1_N, Authorization, TokenDomain, sign_authorization
from tests.gateway.paying import decode_challenge
from tests.reliability.facts import Recorder
from tests.reliability.harness import (
    BODY,
    InProcessGateway,
    Key,
    gateway_process,
    new_key,
    start_inprocess,
)

V2 = "PAYMENT-SIGNATURE"
V1 = "X-PAYMENT"
SIG_OK = frozenset({reasons.INSUFFICIENT_BALANCE})  # signature accepted; no funds to move
BAD_SIG = frozenset({reasons.INVALID_SIGNATURE})
PAYLOAD = frozenset({reasons.INVALID_PAYLOAD})


@dataclass(frozen=True)
class Case:
    name: str
    header: str
    value: str
    expect: frozenset[str] | None  # x402 reasons accepted in the 402; None: any 4xx


def b64(obj: Any) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.b64encode(raw).decode()


class Forge:
    """Builds headers for one challenge, signed (or mis-signed) by an unfunded payer."""

    def __init__(self, challenge_header: str, v1_body: dict[str, Any], payer: Key) -> None:
        self.challenge = decode_challenge(challenge_header)
        self.accepted: dict[str, Any] = self.challenge["accepts"][0]
        self.v1_req: dict[str, Any] = v1_body["accepts"][0]
        self.payer = payer
        self.amount = int(self.accepted["amount"])
        self.domain = TokenDomain(
            self.accepted["extra"]["name"],
            self.accepted["extra"]["version"],
            8453,
            self.accepted["asset"],
        )
        now = int(time.time())
        self.valid = {
            "from": payer.address,
            "to": self.accepted["payTo"],
            "value": str(self.amount),
            "validAfter": str(now - 60),
            "validBefore": str(now + 100),
            "nonce": "0x" + "5a" * 32,
        }
        self.nonce_counter = 0

    def fresh_nonce(self) -> str:
        self.nonce_counter += 1
        return "0x" + self.nonce_counter.to_bytes(32, "big").hex()

    def auth(self, **over: str) -> dict[str, str]:
        return {**self.valid, "nonce": self.fresh_nonce(), **over}

    def signature(self, auth: dict[str, str], key: str | None = None) -> bytes:
        typed = Authorization(
            from_=auth["from"],
            to=auth["to"],
            value=int(auth["value"]),
            valid_after=int(auth["validAfter"]),
            valid_before=int(auth["validBefore"]),
            nonce=bytes.fromhex(auth["nonce"][2:]),
        )
        return sign_authorization(key or self.payer.key, self.domain, typed)

    def v2(
        self,
        auth: dict[str, Any] | None = None,
        sig: str | None = None,
        accepted: dict[str, Any] | None = None,
        **top: Any,
    ) -> dict[str, Any]:
        auth = auth if auth is not None else self.auth()
        if sig is None:
            sig = "0x" + self.signature(auth).hex()
        return {
            "x402Version": 2,
            "resource": self.challenge["resource"],
            "accepted": accepted if accepted is not None else self.accepted,
            "payload": {"signature": sig, "authorization": auth},
            **top,
        }

    def v1(self, auth: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
        auth = auth if auth is not None else self.auth()
        sig = "0x" + self.signature(auth).hex()
        return {
            "x402Version": 1,
            "scheme": self.v1_req["scheme"],
            "network": self.v1_req["network"],
            "payload": {"signature": sig, "authorization": auth},
            **top,
        }

    def with_v(self, v: int, *, high_s: bool = False, flip: bool = False) -> str:
        """A real signature re-encoded: v byte replaced, s mirrored, or parity flipped."""
        auth = self.auth()
        raw = self.signature(auth)
        r, s, parity = raw[:32], int.from_bytes(raw[32:64], "big"), raw[64] - 27
        if high_s:
            s, parity = SECP256K1_N - s, parity ^ 1
        if flip:
            parity ^= 1
        v_byte = v if v not in (0, 1, 27, 28) else (v - v % 2 if v in (0, 1) else 27) + parity
        sig = r + s.to_bytes(32, "big") + bytes([v_byte])
        return b64(self.v2(auth, "0x" + sig.hex()))


def corpus(f: Forge) -> list[Case]:
    other = new_key()
    cases: list[Case] = []

    def add(name: str, value: str, expect: frozenset[str] | None, header: str = V2) -> None:
        cases.append(Case(name, header, value, expect))

    # -- encoding
    add("empty header", "", PAYLOAD)
    add("bad base64 alphabet", "!!!not-base64!!!", PAYLOAD)
    add("base64 with a space", b64(f.v2())[:20] + " " + b64(f.v2())[20:], PAYLOAD)
    add("base64 bad padding", b64(f.v2()) + "=", PAYLOAD)
    add("base64 truncated", b64(f.v2())[:-3], PAYLOAD)
    add("mixed base64 alphabets", "ab+_" * 8, PAYLOAD)
    add("not json", b64(b"hello, world"), PAYLOAD)
    add("not utf-8", b64(b"\xff\xfe\xfd{}"), PAYLOAD)
    add("json array", b64([]), PAYLOAD)
    add("json string", b64("x402"), PAYLOAD)
    add("json null", b64(None), PAYLOAD)
    add("json number", b64(2), PAYLOAD)
    add("NaN literal", b64(b'{"x402Version": NaN}'), PAYLOAD)
    add(
        "duplicate keys",
        b64(b'{"x402Version": 2, "x402Version": 1, "scheme": "exact"}'),
        PAYLOAD,
    )
    add("nested 40 objects", b64(_nest_obj(40)), PAYLOAD)
    add("nested 2000 arrays", b64(b"[" * 2000 + b"]" * 2000), PAYLOAD)
    add("9 KiB header (above the gateway bound)", "A" * (9 * 1024), PAYLOAD)
    # -- wrong types and shapes
    add(
        "x402Version missing", b64({k: v for k, v in f.v2().items() if k != "x402Version"}), PAYLOAD
    )
    add("x402Version as string", b64(f.v2(x402Version="2")), {reasons.INVALID_X402_VERSION})
    add("x402Version as float", b64(f.v2(x402Version=2.0)), {reasons.INVALID_X402_VERSION})
    add("x402Version as bool", b64(f.v2(x402Version=True)), {reasons.INVALID_X402_VERSION})
    add("x402Version 3", b64(f.v2(x402Version=3)), {reasons.INVALID_X402_VERSION})
    add("accepted as list", b64(f.v2(accepted=[f.accepted])), PAYLOAD)  # type: ignore[arg-type]
    add("payload as string", b64({**f.v2(), "payload": "0xdead"}), PAYLOAD)
    add("unknown top-level field", b64(f.v2(smuggled=True)), PAYLOAD)
    add("value as JSON number", b64(f.v2(f.auth(value=f.amount))), PAYLOAD)  # type: ignore[arg-type]
    add(
        "maxTimeoutSeconds as string",
        b64(
            f.v2(accepted={**f.accepted, "maxTimeoutSeconds": str(f.accepted["maxTimeoutSeconds"])})
        ),
        PAYLOAD,
    )
    add(
        "authorization missing nonce",
        b64(f.v2({k: v for k, v in f.auth().items() if k != "nonce"}, sig="0x" + "11" * 65)),
        PAYLOAD,
    )
    add("v1 body in the v2 header", b64(f.v1()), None)
    # -- amounts (each signed over the wire value where it parses)
    add("negative value", b64(f.v2(f.auth(value="-1"), sig="0x" + "11" * 65)), PAYLOAD)
    add("negative amount", b64(f.v2(f.auth(value=f"-{f.amount}"), sig="0x" + "11" * 65)), PAYLOAD)
    add("value 2^256", b64(f.v2(f.auth(value=str(2**256)), sig="0x" + "11" * 65)), PAYLOAD)
    add(
        "value 2^256 + amount (wraps to amount)",
        b64(f.v2(f.auth(value=str(2**256 + f.amount)), sig="0x" + "11" * 65)),
        PAYLOAD,
    )
    add(
        "value hex overflow",
        b64(f.v2(f.auth(value="0x1" + "0" * 64), sig="0x" + "11" * 65)),
        PAYLOAD,
    )
    add("value with exponent", b64(f.v2(f.auth(value="1e4"), sig="0x" + "11" * 65)), PAYLOAD)
    add("value with spaces", b64(f.v2(f.auth(value=f" {f.amount}"), sig="0x" + "11" * 65)), PAYLOAD)
    add(
        "value one below, signed",
        b64(f.v2(f.auth(value=str(f.amount - 1)))),
        {reasons.AUTHORIZATION_VALUE_MISMATCH},
    )
    add(
        "value one above, signed",
        b64(f.v2(f.auth(value=str(f.amount + 1)))),
        {reasons.AUTHORIZATION_VALUE_MISMATCH},
    )
    add(
        "value uint256 max, signed",
        b64(f.v2(f.auth(value=str(2**256 - 1)))),
        {reasons.AUTHORIZATION_VALUE_MISMATCH},
    )
    # -- nonces
    add("nonce 31 bytes", b64(f.v2(f.auth(nonce="0x" + "ab" * 31), sig="0x" + "11" * 65)), PAYLOAD)
    add("nonce 33 bytes", b64(f.v2(f.auth(nonce="0x" + "ab" * 33), sig="0x" + "11" * 65)), PAYLOAD)
    add("nonce without 0x", b64(f.v2(f.auth(nonce="ab" * 32), sig="0x" + "11" * 65)), PAYLOAD)
    add("nonce not hex", b64(f.v2(f.auth(nonce="0x" + "zz" * 32), sig="0x" + "11" * 65)), PAYLOAD)
    # -- signatures
    add("signature valid (control)", b64(f.v2()), SIG_OK)
    add("v = 27/28 right parity", f.with_v(27), SIG_OK)
    add("v = 0/1 right parity", f.with_v(0), SIG_OK)
    add("v = 27/28 wrong parity", f.with_v(27, flip=True), BAD_SIG)
    add("v = 0/1 wrong parity", f.with_v(0, flip=True), BAD_SIG)
    for v in (2, 26, 29, 35, 255):
        add(f"v = {v}", f.with_v(v), BAD_SIG)
    add("high-s (malleated)", f.with_v(27, high_s=True), BAD_SIG)
    add("high-s with v 0/1", f.with_v(0, high_s=True), BAD_SIG)
    auth = f.auth()
    add(
        "signed by another key", b64(f.v2(auth, "0x" + f.signature(auth, other.key).hex())), BAD_SIG
    )
    add("signature 64 bytes", b64(f.v2(sig="0x" + "22" * 64)), BAD_SIG)
    add("signature 66 bytes", b64(f.v2(sig="0x" + "22" * 66)), BAD_SIG)
    add("signature zeros", b64(f.v2(sig="0x" + "00" * 65)), BAD_SIG)
    add("signature empty", b64(f.v2(sig="0x")), PAYLOAD)
    add("signature odd hex", b64(f.v2(sig="0x" + "1" * 129)), PAYLOAD)
    add("signature not hex", b64(f.v2(sig="0x" + "zz" * 65)), PAYLOAD)
    add("signature without 0x", b64(f.v2(sig="22" * 65)), PAYLOAD)
    add("signature 5 KiB", b64(f.v2(sig="0x" + "22" * 5000)), None)
    # -- addresses
    lower = f.payer.address.lower()
    add("from lower-case (valid, signed)", b64(f.v2(f.auth(**{"from": lower}))), SIG_OK)
    add(
        "from upper-case (valid, signed)",
        b64(f.v2(f.auth(**{"from": "0x" + lower[2:].upper()}))),
        SIG_OK,
    )
    bad_checksum = _break_checksum(f.payer.address)
    add(
        "from bad EIP-55 checksum",
        b64(f.v2(f.auth(**{"from": bad_checksum}), sig="0x" + "11" * 65)),
        PAYLOAD,
    )
    add("from too short", b64(f.v2(f.auth(**{"from": "0x1234"}), sig="0x" + "11" * 65)), PAYLOAD)
    add(
        "from not hex",
        b64(f.v2(f.auth(**{"from": "0x" + "g" * 40}), sig="0x" + "11" * 65)),
        PAYLOAD,
    )
    add("from zero address", b64(f.v2(f.auth(**{"from": "0x" + "0" * 40}))), BAD_SIG)
    add(
        "to another address, signed",
        b64(f.v2(f.auth(to=other.address))),
        {reasons.RECIPIENT_MISMATCH},
    )
    add("to lower-case payTo, signed", b64(f.v2(f.auth(to=f.accepted["payTo"].lower()))), SIG_OK)
    # -- v2 `accepted` differing from the offer in exactly one field
    for key, value, want in (
        ("scheme", "upto", {reasons.UNSUPPORTED_SCHEME, reasons.INVALID_SCHEME}),
        ("network", "eip155:84532", {reasons.INVALID_NETWORK}),
        ("amount", str(f.amount - 1), {reasons.AUTHORIZATION_VALUE_MISMATCH}),
        ("asset", "0x036CbD53842c5426634e7929541eC2318f3dCF7e", {reasons.ASSET_MISMATCH}),
        ("payTo", other.address, {reasons.RECIPIENT_MISMATCH}),
        (
            "maxTimeoutSeconds",
            f.accepted["maxTimeoutSeconds"] + 1,
            {reasons.INVALID_PAYMENT_REQUIREMENTS},
        ),
        ("extra", {**f.accepted["extra"], "name": "USDC"}, {reasons.TOKEN_NAME_MISMATCH}),
        ("extra", {**f.accepted["extra"], "version": "1"}, {reasons.TOKEN_VERSION_MISMATCH}),
        ("extra", {**f.accepted["extra"], "bonus": "1"}, {reasons.INVALID_PAYMENT_REQUIREMENTS}),
    ):
        add(
            f"accepted.{key} differs",
            b64(f.v2(accepted={**f.accepted, key: value})),
            frozenset(want),
        )
    # -- time window
    now = int(time.time())
    add(
        "validBefore passed",
        b64(f.v2(f.auth(validBefore=str(now - 1)))),
        {reasons.VALID_BEFORE_EXPIRED},
    )
    add(
        "validBefore too close to settle",
        b64(f.v2(f.auth(validBefore=str(now + 2)))),
        {reasons.VALID_BEFORE_EXPIRED},
    )
    add(
        "validAfter in the future",
        b64(f.v2(f.auth(validAfter=str(now + 3600)))),
        {reasons.VALID_AFTER_IN_FUTURE},
    )
    # -- v1 (X-PAYMENT)
    add("v1 valid (control)", b64(f.v1()), SIG_OK, V1)
    add("v1 wrong network", b64(f.v1(network="base-sepolia")), {reasons.INVALID_NETWORK}, V1)
    add(
        "v1 wrong scheme",
        b64(f.v1(scheme="upto")),
        {reasons.UNSUPPORTED_SCHEME, reasons.INVALID_SCHEME},
        V1,
    )
    add("v1 CAIP-2 network", b64(f.v1(network="eip155:8453")), None, V1)
    add(
        "v1 missing payload",
        b64({"x402Version": 1, "scheme": "exact", "network": "base"}),
        PAYLOAD,
        V1,
    )
    add("v1 bad base64", "%%%", PAYLOAD, V1)
    return [
        Case(c.name, c.header, c.value, frozenset(c.expect) if c.expect else None) for c in cases
    ]


def _nest_obj(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {}
    for _ in range(depth):
        node = {"x402Version": 2, "a": node}
    return node


def _break_checksum(address: str) -> str:
    body = address[2:]
    for i, ch in enumerate(body):
        if ch.isalpha():
            return "0x" + body[:i] + ch.swapcase() + body[i + 1 :]
    raise AssertionError("an address with no letters")


@pytest.fixture(scope="module")
def strict_gateway(
    local_chain: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessGateway]:
    # Rate limits off: this suite wants the reason of every refusal, not a 429 after 20.
    gw = start_inprocess(
        local_chain,
        tmp_path_factory.mktemp("hostile"),
        challenge_rate_per_ip=0,
        refusal_rate_per_payer=0,
    )
    try:
        yield gw
    finally:
        gw.stop()


def _reason(r: httpx.Response) -> str | None:
    if r.status_code == 402:
        v2 = decode_challenge(r.headers["payment-required"])["error"]
        assert r.json()["error"] == v2, "both challenge forms carry the same reason"
        return str(v2)
    try:
        body = r.json()
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None


def test_every_malformed_header_is_a_4xx_with_a_reason(
    strict_gateway: InProcessGateway, local_chain: Any, facts: Recorder
) -> None:
    payer = new_key()  # holds no USDC: nothing here can ever settle
    with httpx.Client(base_url=strict_gateway.url, timeout=30) as http:
        first = http.post("/generation/create", json=BODY)
        assert first.status_code == 402
        forge = Forge(first.headers["payment-required"], first.json(), payer)
        pay_to_before = local_chain.usdc_balance(strict_gateway.pay_to)
        cases = corpus(forge)
        wrong: list[str] = []
        for case in cases:
            r = http.post("/generation/create", json=BODY, headers={case.header: case.value})
            reason = _reason(r)
            if not 400 <= r.status_code < 500:
                wrong.append(f"{case.name}: {r.status_code} {r.text[:200]}")
            elif not reason:
                wrong.append(f"{case.name}: {r.status_code} without a reason")
            elif case.expect is not None and reason not in case.expect:
                wrong.append(f"{case.name}: reason {reason}, wanted {sorted(case.expect)}")
            health = http.get("/healthz")
            assert health.status_code == 200 and health.json()["status"] == "ok", case.name
    assert not wrong, "\n".join(wrong)
    assert local_chain.usdc_balance(strict_gateway.pay_to) == pay_to_before
    facts.record(
        "inputs", suite="malformed payment headers", target="gateway", count=len(cases), crashes=0
    )


@pytest.mark.parametrize("size", [64 * 1024, 1024 * 1024])
def test_huge_header_is_refused_and_the_server_stays_up(
    strict_gateway: InProcessGateway, size: int, facts: Recorder
) -> None:
    value = "A" * size
    with httpx.Client(base_url=strict_gateway.url, timeout=30) as http:
        for header in (V2, V1, "X-Anything"):
            try:
                r = http.post("/generation/create", json=BODY, headers={header: value})
            except httpx.RemoteProtocolError:
                status = 0  # the HTTP parser cut the connection: refused, not crashed
            else:
                status = r.status_code
                assert 400 <= status < 500, (header, status, r.text[:200])
                assert r.status_code == 431 or _reason(r), r.text[:200]
            assert http.get("/healthz").json()["status"] == "ok"
            facts.record("huge_header", bytes=size, header=header, status=status)


hostile_values = (
    st.text(max_size=300)
    | st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())
    | st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=30),
        lambda kids: (
            st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=10), kids, max_size=3)
        ),
        max_leaves=15,
    ).map(lambda v: base64.b64encode(json.dumps(v).encode()).decode())
)


def test_random_headers_never_5xx(strict_gateway: InProcessGateway, facts: Recorder) -> None:
    tried = 0
    with httpx.Client(base_url=strict_gateway.url, timeout=30) as http:

        @settings(
            max_examples=150,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(st.sampled_from([V2, V1]), hostile_values)
        def send(header: str, value: str) -> None:
            nonlocal tried
            # what a client can put on the wire: latin-1 bytes, no CR/LF/NUL, no outer blanks
            raw = value.encode("latin-1", "replace").translate(None, b"\r\n\x00").strip(b" \t")
            if not raw:
                return
            tried += 1
            r = http.post("/generation/create", json=BODY, headers={header: raw})
            assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
            # a control byte is refused by the HTTP parser before our app sees it
            assert _reason(r) or r.text == "Invalid HTTP request received.", r.text[:200]

        send()
        assert http.get("/healthz").json()["status"] == "ok"
    facts.record("inputs", suite="random payment headers", target="gateway", count=tried, crashes=0)


def test_headers_probe_deep_nesting_and_bodies(
    strict_gateway: InProcessGateway, facts: Recorder
) -> None:
    """Hostile bodies next to a payment header: the body is judged first (400), no 5xx."""
    bodies: list[bytes] = [
        b"",
        b"{",
        b"[" * 5_000 + b"]" * 5_000,
        json.dumps(_nest_obj(500)).encode(),
        b'{"prompt": "x", "templateData": {"duration": 1e400}}',
        b'{"prompt": "x", "templateData": {"duration": -1}}',
        b'{"prompt": "x", "templateData": {"duration": 99999999999999999999999}}',
        b'{"prompt": "' + b"x" * 3000 + b'"}',
        b'{"prompt": "\\ud800"}',
        b'{"prompt": "x", "prompt": "y"}',
        b"\xff\xfe",
    ]
    with httpx.Client(base_url=strict_gateway.url, timeout=30) as http:
        for body in bodies:
            r = http.post(
                "/generation/create",
                content=body,
                headers={"content-type": "application/json", V2: b64(b"{}")},
            )
            assert 400 <= r.status_code < 500, (body[:40], r.status_code, r.text[:200])
            assert r.json().get("error"), r.text[:200]
        assert http.get("/healthz").json()["status"] == "ok"
    facts.record("inputs", suite="hostile bodies", target="gateway", count=len(bodies), crashes=0)


def test_deeply_nested_body_does_not_kill_the_gateway(
    local_chain: Any, tmp_path: Path, facts: Recorder
) -> None:
    # Regression test for a SIGSEGV: py_ecc raises the recursion limit to 100000 at import, and
    # json.loads of a deep document then overflowed the C stack. In a subprocess, so that a
    # regression cannot take the test runner down with it.
    gw = gateway_process(local_chain, tmp_path)
    gw.start().wait_up()
    try:
        depth = 100_000
        try:
            r = httpx.post(
                f"{gw.url}/generation/create",
                content=b"[" * depth + b"]" * depth,
                headers={"content-type": "application/json"},
                timeout=30,
            )
            status = r.status_code
        except httpx.TransportError:
            status = 0
        time.sleep(0.2)
        alive = gw.proc is not None and gw.proc.poll() is None
        facts.record("deep_body", depth=depth, status=status, alive=alive)
        assert alive, f"the gateway died ({gw.proc and gw.proc.returncode}) on a nested body"
        assert status == 400
    finally:
        gw.kill()

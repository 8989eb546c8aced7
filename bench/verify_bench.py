"""Micro-benchmark of the offline verify path on one core (prints figures; not a test).

    .venv/bin/python bench/verify_bench.py [--seconds 1.0]

Measures, in one run and on the same pre-signed payments:
- signer recovery: coincurve (what payments.eip3009 uses) vs eth-keys' default backend
  (whatever eth-keys picks here, named in the output) vs eth-keys' pure-Python backend;
- the EIP-712 digest alone;
- full `verify_offline` (all ordered checks + digest + recovery) with coincurve, and the same
  with eth-keys' backends swapped in as the baseline;
- decode + match + verify_offline from the raw header string (what a request costs).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import time
from collections.abc import Callable
from typing import Any

from eth_keys.backends.native.main import NativeECCBackend
from eth_keys.datatypes import Signature
from eth_keys.main import KeyAPI

import payments.verify as verify_module
from payments.eip3009 import Authorization, authorization_digest, keccak256, sign_authorization
from payments.networks import BASE
from payments.requirements import Requirement
from payments.verify import Payment, match_requirement, verify_offline
from payments.wire import decode_payment_header, exact_evm_payload

NOW = 1_750_000_000
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
REQ = Requirement(network=BASE, amount=10_000, pay_to=PAY_TO, resource_url="http://bench/")


def _pin_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    return "not pinned"


def _payments(count: int) -> tuple[list[Payment], list[str]]:
    payments: list[Payment] = []
    headers: list[str] = []
    for i in range(count):
        key = keccak256(f"bench-payer-{i}".encode())
        auth = Authorization(
            from_=KeyAPI().PrivateKey(key).public_key.to_checksum_address(),
            to=PAY_TO,
            value=REQ.amount,
            valid_after=NOW - 600,
            valid_before=NOW + 60,
            nonce=keccak256(f"nonce-{i}".encode()),
        )
        signature = sign_authorization(key, REQ.domain, auth)
        body = {
            "x402Version": 2,
            "resource": {"url": REQ.resource_url},
            "accepted": REQ.v2_dict(),
            "payload": exact_evm_payload(auth, signature),
        }
        header = base64.b64encode(json.dumps(body).encode()).decode()
        headers.append(header)
        payments.append(match_requirement(decode_payment_header(header), [REQ]))
    return payments, headers


def _rate(fn: Callable[[Any], object], items: list[Any], seconds: float) -> float:
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for item in items:
            fn(item)
        done += len(items)
        now = time.perf_counter()
        if now >= deadline or done >= 2_000_000:
            return done / (now - start)


def _eth_keys_recover(api: KeyAPI) -> Callable[[bytes, bytes], bytes | None]:
    def recover(digest: bytes, signature: bytes) -> bytes | None:
        v = signature[64] - 27
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:64], "big")
        public = Signature(vrs=(v, r, s), backend=api.backend).recover_public_key_from_msg_hash(
            digest
        )
        return bytes(public.to_canonical_address())

    return recover


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--payments", type=int, default=200, help="distinct signed payments")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args()

    pinned = _pin_one_core()
    payments, headers = _payments(args.payments)
    digests = [(p.digest, p.signature) for p in payments]
    default_api = KeyAPI()
    native_api = KeyAPI(NativeECCBackend)
    default_name = type(default_api.backend).__name__
    coincurve_recover = verify_module.recover_address  # type: ignore[attr-defined]
    default_recover = _eth_keys_recover(default_api)
    native_recover = _eth_keys_recover(native_api)
    for digest, signature in digests[:5]:  # all three must agree before we time them
        assert coincurve_recover(digest, signature) == default_recover(digest, signature)
        assert default_recover(digest, signature) == native_recover(digest, signature)

    sec = args.seconds
    rows: list[tuple[str, float]] = []
    rows.append(("recover: coincurve", _rate(lambda d: coincurve_recover(*d), digests, sec)))
    rows.append(
        (
            f"recover: eth-keys default ({default_name})",
            _rate(lambda d: default_recover(*d), digests, sec),
        )
    )
    rows.append(
        (
            "recover: eth-keys NativeECCBackend",
            _rate(lambda d: native_recover(*d), digests[:20], sec),
        )
    )
    rows.append(
        (
            "EIP-712 digest only",
            _rate(
                lambda p: authorization_digest(p.requirement.domain, p.authorization), payments, sec
            ),
        )
    )

    def full(p: Payment) -> None:
        assert verify_offline(p, now=NOW) is not None

    rows.append(("verify_offline: coincurve", _rate(full, payments, sec)))
    try:
        setattr(verify_module, "recover_address", default_recover)  # noqa: B010
        rows.append(
            (f"verify_offline: eth-keys default ({default_name})", _rate(full, payments, sec))
        )
        setattr(verify_module, "recover_address", native_recover)  # noqa: B010
        rows.append(("verify_offline: eth-keys NativeECCBackend", _rate(full, payments[:20], sec)))
    finally:
        setattr(verify_module, "recover_address", coincurve_recover)  # noqa: B010

    def end_to_end(header: str) -> None:
        payment = match_requirement(decode_payment_header(header, version=2), [REQ])
        assert verify_offline(payment, now=NOW) is not None

    rows.append(("decode+match+verify_offline (coincurve)", _rate(end_to_end, headers, sec)))

    if args.json:
        print(json.dumps({"pinned": pinned, "per_second": dict(rows)}))
        return
    print(f"verify bench: one process, {pinned}, {args.payments} distinct payments, {sec:g}s each")
    width = max(len(name) for name, _ in rows)
    for name, per_s in rows:
        print(f"  {name:<{width}}  {per_s:>12,.0f} /s  ({1e6 / per_s:8.1f} us)")


if __name__ == "__main__":
    main()

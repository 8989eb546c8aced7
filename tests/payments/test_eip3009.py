"""EIP-712 digest, signing and recovery, checked against eth-account on stored vectors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from payments.eip3009 import (
    SECP256K1_N,
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
from payments.networks import BASE, BASE_SEPOLIA

VECTOR_DIR = Path(__file__).parent / "vectors"
TYPED = json.loads((VECTOR_DIR / "eip712_transfer_with_authorization.json").read_text())
SIGS = json.loads((VECTOR_DIR / "signatures.json").read_text())

_TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ],
}


def _key(label: str) -> bytes:
    return keccak(text=label)


def _typed(vec: dict[str, Any]) -> tuple[TokenDomain, Authorization]:
    d, m = vec["domain"], vec["message"]
    domain = TokenDomain(d["name"], d["version"], d["chainId"], d["verifyingContract"])
    auth = Authorization(
        from_=m["from"],
        to=m["to"],
        value=int(m["value"]),
        valid_after=int(m["validAfter"]),
        valid_before=int(m["validBefore"]),
        nonce=bytes.fromhex(m["nonce"][2:]),
    )
    return domain, auth


def _eth_account_message(domain: TokenDomain, auth: Authorization) -> dict[str, Any]:
    return {
        "types": _TYPES,
        "primaryType": "TransferWithAuthorization",
        "domain": {
            "name": domain.name,
            "version": domain.version,
            "chainId": domain.chain_id,
            "verifyingContract": domain.verifying_contract,
        },
        "message": {
            "from": auth.from_,
            "to": auth.to,
            "value": auth.value,
            "validAfter": auth.valid_after,
            "validBefore": auth.valid_before,
            "nonce": auth.nonce,
        },
    }


def _eth_account_digest(domain: TokenDomain, auth: Authorization) -> bytes:
    signable = encode_typed_data(full_message=_eth_account_message(domain, auth))
    return bytes(keccak(b"\x19" + signable.version + signable.header + signable.body))


@pytest.mark.parametrize("vec", TYPED, ids=lambda v: v["name"])
def test_digest_matches_vector_and_eth_account(vec: dict[str, Any]) -> None:
    domain, auth = _typed(vec)
    ours = authorization_digest(domain, auth)
    assert ours.hex() == vec["digest"][2:]
    assert ours == _eth_account_digest(domain, auth)


@pytest.mark.parametrize("vec", TYPED, ids=lambda v: v["name"])
def test_sign_is_byte_identical_to_eth_account_and_recovers(vec: dict[str, Any]) -> None:
    domain, auth = _typed(vec)
    key = _key(vec["private_key_label"])
    signature = sign_authorization(key, domain, auth)
    assert signature.hex() == vec["signature"][2:]
    reference = Account.sign_typed_data(key, full_message=_eth_account_message(domain, auth))
    assert signature == bytes(reference.signature)
    assert signature[64] in (27, 28)
    assert int.from_bytes(signature[32:64], "big") <= SECP256K1_N // 2
    digest = authorization_digest(domain, auth)
    assert recover_signer(digest, signature) == vec["signer"] == Account.from_key(key).address


def test_sign_accepts_hex_keys_and_rejects_bad_ones() -> None:
    domain, auth = _typed(TYPED[0])
    key = _key("payer-1")
    assert sign_authorization("0x" + key.hex(), domain, auth) == sign_authorization(
        key.hex(), domain, auth
    )
    for bad in (b"\x01" * 31, "0x1234", "zz" * 32):
        with pytest.raises(ValueError, match="private key"):
            sign_authorization(bad, domain, auth)


def test_any_field_changes_the_digest() -> None:
    domain, auth = _typed(TYPED[0])
    base = authorization_digest(domain, auth)
    variants = [
        Authorization(
            auth.to, auth.to, auth.value, auth.valid_after, auth.valid_before, auth.nonce
        ),
        Authorization(auth.from_, auth.from_, auth.value, 0, auth.valid_before, auth.nonce),
        Authorization(auth.from_, auth.to, auth.value + 1, 0, auth.valid_before, auth.nonce),
        Authorization(auth.from_, auth.to, auth.value, 1, auth.valid_before, auth.nonce),
        Authorization(auth.from_, auth.to, auth.value, 0, auth.valid_before + 1, auth.nonce),
        Authorization(auth.from_, auth.to, auth.value, 0, auth.valid_before, b"\x00" * 32),
    ]
    digests = {authorization_digest(domain, v) for v in variants}
    assert base not in digests
    assert len(digests) == len(variants)
    other_domain = TokenDomain("USDC", "2", domain.chain_id, domain.verifying_contract)
    assert authorization_digest(other_domain, auth) != base


def test_network_domains_are_the_spec_values() -> None:
    assert BASE.token_domain == TokenDomain(
        "USD Coin", "2", 8453, "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    )
    assert BASE_SEPOLIA.token_domain == TokenDomain(
        "USDC", "2", 84532, "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
    )
    assert domain_separator(BASE.token_domain) != domain_separator(BASE_SEPOLIA.token_domain)


@pytest.mark.parametrize("case", SIGS["cases"], ids=lambda c: c["name"])
def test_recovery_vectors(case: dict[str, Any]) -> None:
    digest = bytes.fromhex(SIGS["digest"][2:])
    signature = bytes.fromhex(case["signature"][2:])
    assert recover_signer(digest, signature) == case["signer"]
    assert (recover_address(digest, signature) is None) == (case["signer"] is None)


def test_high_s_twin_really_is_the_same_key_without_the_check() -> None:
    """The high-s vector is a real malleable twin (libsecp256k1 would accept it if normalised)."""
    import coincurve

    digest = bytes.fromhex(SIGS["digest"][2:])
    (case,) = [c for c in SIGS["cases"] if c["name"] == "high-s-twin"]
    sig = bytes.fromhex(case["signature"][2:])
    s = int.from_bytes(sig[32:64], "big")
    assert s > SECP256K1_N // 2
    low = sig[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([(sig[64] - 27) ^ 1])
    public = coincurve.PublicKey.from_signature_and_message(low, digest, hasher=None)
    address = keccak(public.format(compressed=False)[1:])[12:]
    assert to_checksum_address(address) == TYPED[0]["signer"]


def test_wrong_digest_recovers_someone_else() -> None:
    digest = bytes.fromhex(SIGS["digest"][2:])
    signature = bytes.fromhex(SIGS["cases"][0]["signature"][2:])
    other = bytes([digest[0] ^ 1]) + digest[1:]
    assert recover_signer(other, signature) not in (None, TYPED[0]["signer"])
    assert recover_signer(digest[:31], signature) is None


def test_split_signature_normalises_v() -> None:
    signature = bytes.fromhex(SIGS["cases"][0]["signature"][2:])
    v, r, s = split_signature(signature)
    assert (r, s) == (signature[:32], signature[32:64])
    assert v == signature[64] in (27, 28)
    assert split_signature(signature[:64] + bytes([v - 27]))[0] == v
    for bad in (signature[:64], signature[:64] + b"\x05"):
        with pytest.raises(ValueError):
            split_signature(bad)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (
            "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913",
            "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
        ),
        (
            "0x833589FCD6EDB6E08F4C7C32D4F71B54BDA02913",
            "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
        ),
        (
            "0X833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
            "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
        ),
        ("0x" + "0" * 40, "0x" + "0" * 40),
    ],
)
def test_normalize_address_accepts(given: str, expected: str) -> None:
    assert normalize_address(given) == expected == to_checksum_address(given.lower())


@pytest.mark.parametrize(
    "given",
    [
        "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913".replace("fCD", "fcD"),  # bad checksum
        "0x833589fcd6edb6e08f4c7c32d4f71b54bda0291",  # 39 hex digits
        "0x833589fcd6edb6e08f4c7c32d4f71b54bda029130",  # 41
        "833589fcd6edb6e08f4c7c32d4f71b54bda02913",  # no prefix
        "0x833589fcd6edb6e08f4c7c32d4f71b54bda0291g",
        " 0x833589fcd6edb6e08f4c7c32d4f71b54bda02913",
        "",
    ],
)
def test_normalize_address_refuses(given: str) -> None:
    with pytest.raises(ValueError):
        normalize_address(given)


def test_typed_values_validate_themselves() -> None:
    a = "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"
    auth = Authorization(a, a, 1, 0, 1, b"\x00" * 32)
    assert auth.from_ == auth.to == "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    with pytest.raises(ValueError, match="nonce"):
        Authorization(a, a, 1, 0, 1, b"\x00" * 31)
    with pytest.raises(ValueError, match="uint256"):
        Authorization(a, a, 2**256, 0, 1, b"\x00" * 32)
    with pytest.raises(ValueError, match="uint256"):
        Authorization(a, a, -1, 0, 1, b"\x00" * 32)
    with pytest.raises(TypeError):
        Authorization(a, a, True, 0, 1, b"\x00" * 32)
    with pytest.raises(ValueError):
        TokenDomain("USD Coin", "2", 0, a)


def test_random_nonce_uses_the_injected_source() -> None:
    assert random_nonce(lambda n: b"\x07" * n) == b"\x07" * 32
    assert len({random_nonce() for _ in range(16)}) == 16
    with pytest.raises(ValueError):
        random_nonce(lambda n: b"\x07" * (n - 1))

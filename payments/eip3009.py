"""EIP-712 / EIP-3009 `TransferWithAuthorization`: typed values, digest, signing, recovery.

Pure: no I/O, no clock; randomness is injected (`random_nonce(rng)`).

The verify path is hot (thousands per second on one core), so the digest is built by hand from
a precomputed type hash and a cached domain separator with pycryptodome's keccak, and the
signer is recovered with coincurve (libsecp256k1) -- no typed-data JSON machinery per call.
`tests/payments/test_eip3009.py` checks the digest against eth-account's `encode_typed_data`.

Decisions (documented here because other modules rely on them):
- Addresses: all-lowercase, all-uppercase, or valid EIP-55 mixed case are accepted ("0x" or
  "0X" prefix); a mixed-case address whose checksum is wrong is refused (it is a typo). Every
  address leaving this module is EIP-55 checksummed.
- Signatures for ecrecover are exactly 65 bytes r||s||v. `s` must be in the lower half of the
  curve order (EIP-2: the malleable twin is refused), r and s non-zero and below n.
  v may be 27/28 or 0/1: both are accepted by `recover_address`; `split_signature` returns v
  normalised to 27/28 because the token's ecrecover only accepts those. Signature bytes are
  kept exactly as sent so EIP-1271 wallets (which give their own meaning to v) still work.
- Signing always produces low-s, v in {27, 28} (same bytes as eth-account's sign_typed_data).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

import coincurve
from Crypto.Hash import keccak as _keccak
from eth_keys.datatypes import PrivateKey as _EthPrivateKey

__all__ = [
    "EIP712_DOMAIN_TYPEHASH",
    "SECP256K1_N",
    "TRANSFER_WITH_AUTHORIZATION_TYPEHASH",
    "Authorization",
    "TokenDomain",
    "authorization_digest",
    "domain_separator",
    "keccak256",
    "normalize_address",
    "random_nonce",
    "recover_address",
    "recover_signer",
    "sign_authorization",
    "split_signature",
]

SECP256K1_N: Final = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_HALF_N: Final = SECP256K1_N // 2
_UINT256_MAX: Final = 2**256 - 1
_ADDRESS_RE: Final = re.compile(r"0[xX][0-9a-fA-F]{40}")
_ZERO12: Final = b"\x00" * 12


def keccak256(data: bytes) -> bytes:
    """Ethereum's keccak-256 (not NIST SHA3-256)."""
    return _keccak.new(digest_bits=256, data=data).digest()


EIP712_DOMAIN_TYPEHASH: Final = keccak256(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
TRANSFER_WITH_AUTHORIZATION_TYPEHASH: Final = keccak256(
    b"TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    b"uint256 validBefore,bytes32 nonce)"
)


@lru_cache(maxsize=8192)
def _checksum(lower_hex40: str) -> str:
    digest = keccak256(lower_hex40.encode("ascii")).hex()
    return "0x" + "".join(
        ch.upper() if ch > "9" and digest[i] > "7" else ch for i, ch in enumerate(lower_hex40)
    )


@lru_cache(maxsize=8192)
def normalize_address(value: str) -> str:
    """Validate a 20-byte hex address and return it EIP-55 checksummed; ValueError if invalid."""
    if not isinstance(value, str) or _ADDRESS_RE.fullmatch(value) is None:
        raise ValueError("not a 0x-prefixed 20-byte hex address")
    body = value[2:]
    lower = body.lower()
    checksummed = _checksum(lower)
    if body != lower and body != body.upper() and body != checksummed[2:]:
        raise ValueError("mixed-case address with an invalid EIP-55 checksum")
    return checksummed


@dataclass(frozen=True, slots=True)
class TokenDomain:
    """The EIP-712 domain of an EIP-3009 token (FiatToken: name, version, chainId, address)."""

    name: str
    version: str
    chain_id: int
    verifying_contract: str

    def __post_init__(self) -> None:
        if isinstance(self.chain_id, bool) or not 0 < self.chain_id <= _UINT256_MAX:
            raise ValueError("chain_id must be a positive uint256")
        object.__setattr__(self, "verifying_contract", normalize_address(self.verifying_contract))


@dataclass(frozen=True, slots=True)
class Authorization:
    """A `TransferWithAuthorization` message with real types (addresses checksummed)."""

    from_: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "from_", normalize_address(self.from_))
        object.__setattr__(self, "to", normalize_address(self.to))
        for name in ("value", "valid_after", "valid_before"):
            number = getattr(self, name)
            if isinstance(number, bool) or not isinstance(number, int):
                raise TypeError(f"{name} must be an int")
            if not 0 <= number <= _UINT256_MAX:
                raise ValueError(f"{name} must fit in uint256")
        if not isinstance(self.nonce, bytes) or len(self.nonce) != 32:
            raise ValueError("nonce must be exactly 32 bytes")


@lru_cache(maxsize=256)
def domain_separator(domain: TokenDomain) -> bytes:
    """hashStruct(EIP712Domain); cached because a gateway uses one or two domains."""
    return keccak256(
        EIP712_DOMAIN_TYPEHASH
        + keccak256(domain.name.encode("utf-8"))
        + keccak256(domain.version.encode("utf-8"))
        + domain.chain_id.to_bytes(32, "big")
        + _ZERO12
        + bytes.fromhex(domain.verifying_contract[2:])
    )


def authorization_digest(domain: TokenDomain, auth: Authorization) -> bytes:
    """The 32-byte EIP-712 digest the payer signs: keccak(0x1901 || domainSep || structHash)."""
    struct_hash = keccak256(
        TRANSFER_WITH_AUTHORIZATION_TYPEHASH
        + _ZERO12
        + bytes.fromhex(auth.from_[2:])
        + _ZERO12
        + bytes.fromhex(auth.to[2:])
        + auth.value.to_bytes(32, "big")
        + auth.valid_after.to_bytes(32, "big")
        + auth.valid_before.to_bytes(32, "big")
        + auth.nonce
    )
    return keccak256(b"\x19\x01" + domain_separator(domain) + struct_hash)


def _private_key_bytes(private_key: bytes | str) -> bytes:
    if isinstance(private_key, str):
        text = private_key[2:] if private_key[:2] in ("0x", "0X") else private_key
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise ValueError("private key is not hex") from None
    else:
        raw = bytes(private_key)
    if len(raw) != 32:
        raise ValueError("private key must be 32 bytes")
    return raw


def sign_authorization(private_key: bytes | str, domain: TokenDomain, auth: Authorization) -> bytes:
    """Sign as the payer: 65 bytes r||s||v with low s and v in {27, 28}."""
    digest = authorization_digest(domain, auth)
    sig = _EthPrivateKey(_private_key_bytes(private_key)).sign_msg_hash(digest)
    r, s, v = int(sig.r), int(sig.s), int(sig.v)
    if s > _HALF_N:  # every backend should already give low s; never emit a malleable one
        s, v = SECP256K1_N - s, v ^ 1
    return r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([27 + v])


def split_signature(signature: bytes) -> tuple[int, bytes, bytes]:
    """(v, r, s) for the token's v,r,s overload; v normalised to 27/28. ValueError if not 65B."""
    if len(signature) != 65:
        raise ValueError("an ECDSA signature is 65 bytes")
    v = signature[64]
    if v in (0, 1):
        v += 27
    if v not in (27, 28):
        raise ValueError("signature v must be 27/28 (or 0/1)")
    return v, signature[:32], signature[32:64]


def recover_address(digest: bytes, signature: bytes) -> bytes | None:
    """The 20-byte signer address, or None for any malformed / malleable signature."""
    if len(signature) != 65 or len(digest) != 32:
        return None
    v = signature[64]
    if v >= 27:
        v -= 27
    if v not in (0, 1):
        return None
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    if not (0 < r < SECP256K1_N and 0 < s <= _HALF_N):
        return None
    try:
        public = coincurve.PublicKey.from_signature_and_message(
            signature[:64] + bytes((v,)), digest, hasher=None
        )
    except ValueError:
        return None
    return keccak256(public.format(compressed=False)[1:])[12:]


def recover_signer(digest: bytes, signature: bytes) -> str | None:
    """Checksummed signer address recovered with coincurve, or None (bad len, high s, bad v)."""
    raw = recover_address(digest, signature)
    return None if raw is None else _checksum(raw.hex())


def random_nonce(rng: Callable[[int], bytes] = secrets.token_bytes) -> bytes:
    """A fresh 32-byte authorization nonce from the injected randomness source."""
    nonce = rng(32)
    if len(nonce) != 32:
        raise ValueError("rng must return exactly 32 bytes")
    return nonce

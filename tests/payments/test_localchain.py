"""The Anvil harness and the test USDC behave like USDC on Base where x402 can tell.

Everything here is real: the anvil process, keys, EIP-712 signatures made by eth_account,
transactions mined on chain. The session chain is shared, so these tests never move its clock.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from eth_abi.abi import decode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils.address import to_checksum_address

from payments._abi import (
    REVERT_AUTHORIZATION_EXPIRED,
    REVERT_AUTHORIZATION_NOT_YET_VALID,
    REVERT_AUTHORIZATION_USED,
    REVERT_CALLER_NOT_PAYEE,
    REVERT_INSUFFICIENT_BALANCE,
    REVERT_INVALID_SIGNATURE,
    REVERT_INVALID_SIGNATURE_S,
    TRANSFER_EVENT_TOPIC,
)
from payments.localchain import (
    CANONICAL_USDC,
    DevAccount,
    LocalChain,
    LocalChainError,
    RpcError,
    TransactionReverted,
    encode_call,
    find_anvil,
    load_artifact,
)
from tests.helpers import revert_reason

pytestmark = pytest.mark.chain

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_AUTH_TYPES = "address,address,uint256,uint256,uint256,bytes32"
TWA_VRS = f"transferWithAuthorization({_AUTH_TYPES},uint8,bytes32,bytes32)"
TWA_BYTES = f"transferWithAuthorization({_AUTH_TYPES},bytes)"
RWA_VRS = f"receiveWithAuthorization({_AUTH_TYPES},uint8,bytes32,bytes32)"
CANCEL_VRS = "cancelAuthorization(address,bytes32,uint8,bytes32,bytes32)"
_AUTH_FIELDS = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]

PayerFactory = Callable[..., DevAccount]


def domain(chain_id: int = 8453, contract: str = CANONICAL_USDC) -> dict[str, Any]:
    return {"name": "USD Coin", "version": "2", "chainId": chain_id, "verifyingContract": contract}


def sign_auth(
    key: str, message: dict[str, Any], primary: str = "TransferWithAuthorization"
) -> tuple[int, bytes, bytes]:
    """(v, r, s) of an EIP-712 signature by `key`, made by eth_account."""
    types = {primary: _AUTH_FIELDS}
    if primary == "CancelAuthorization":
        types = {primary: [{"name": "authorizer", "type": "address"}, _AUTH_FIELDS[5]]}
    signed = Account.sign_typed_data(
        key, domain_data=domain(), message_types=types, message_data=message
    )
    return signed.v, signed.r.to_bytes(32, "big"), signed.s.to_bytes(32, "big")


def auth_message(
    chain: LocalChain, payer: str, to: str, amount: int, **overrides: Any
) -> dict[str, Any]:
    now = chain.latest_timestamp()
    message: dict[str, Any] = {
        "from": payer,
        "to": to,
        "value": amount,
        "validAfter": now - 60,
        "validBefore": now + 3600,
        "nonce": secrets.token_bytes(32),
    }
    message.update(overrides)
    return message


def auth_args(message: dict[str, Any]) -> list[Any]:
    return [message[f["name"]] for f in _AUTH_FIELDS]


def fresh_address() -> str:
    address: str = Account.create().address
    return address


def call_str(chain: LocalChain, signature: str) -> str:
    (value,) = decode(["string"], chain.call(CANONICAL_USDC, encode_call(signature)))
    return str(value)


def expect_revert(chain: LocalChain, data: bytes, reason: str, sender: str | None = None) -> None:
    """Both a simulation and a mined transaction must refuse with exactly this reason."""
    with pytest.raises(RpcError) as simulated:
        chain.call(CANONICAL_USDC, data, sender=sender)
    assert revert_reason(simulated.value) == reason
    with pytest.raises(TransactionReverted) as mined:
        chain.send(CANONICAL_USDC, data, sender=sender)
    assert mined.value.reason == reason


# ---------------------------------------------------------------------- token identity


def test_token_at_canonical_address_looks_like_base_usdc(local_chain: LocalChain) -> None:
    assert local_chain.chain_id == 8453
    assert local_chain.usdc_address == "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    assert int(local_chain.rpc("eth_chainId"), 16) == 8453
    code = local_chain.rpc("eth_getCode", [CANONICAL_USDC, "latest"])
    assert code == load_artifact("TestUSDC")["deployedBytecode"]
    assert call_str(local_chain, "name()") == "USD Coin"
    assert call_str(local_chain, "symbol()") == "USDC"
    assert call_str(local_chain, "version()") == "2"
    (decimals,) = decode(["uint8"], local_chain.call(CANONICAL_USDC, encode_call("decimals()")))
    assert decimals == 6


def test_domain_separator_matches_eip712_computed_off_chain(local_chain: LocalChain) -> None:
    (on_chain,) = decode(
        ["bytes32"], local_chain.call(CANONICAL_USDC, encode_call("DOMAIN_SEPARATOR()"))
    )
    # A SignableMessage's header is the EIP-712 domain separator.
    off_chain = encode_typed_data(
        full_message={
            "types": {
                "EIP712Domain": [
                    {"name": "name", "type": "string"},
                    {"name": "version", "type": "string"},
                    {"name": "chainId", "type": "uint256"},
                    {"name": "verifyingContract", "type": "address"},
                ],
                "TransferWithAuthorization": _AUTH_FIELDS,
            },
            "primaryType": "TransferWithAuthorization",
            "domain": domain(),
            "message": auth_message(local_chain, fresh_address(), fresh_address(), 1),
        }
    ).header
    assert on_chain == off_chain
    # Storage-free: the separator follows address(this), so the deploy address has its own.
    assert (
        off_chain
        != encode_typed_data(
            domain(contract=fresh_address()),
            {"TransferWithAuthorization": _AUTH_FIELDS},
            auth_message(local_chain, fresh_address(), fresh_address(), 1),
        ).header
    )


# ---------------------------------------------------------------------- EIP-3009, EOA payer


def test_signed_transfer_with_authorization_moves_exact_balances(
    local_chain: LocalChain, funded_payer: PayerFactory
) -> None:
    payer = funded_payer(usdc=10_000_000)
    pay_to = fresh_address()
    message = auth_message(local_chain, payer.address, pay_to, 250_000)
    v, r, s = sign_auth(payer.private_key, message)

    receipt = local_chain.send(CANONICAL_USDC, encode_call(TWA_VRS, *auth_args(message), v, r, s))

    assert local_chain.usdc_balance(payer.address) == 10_000_000 - 250_000
    assert local_chain.usdc_balance(pay_to) == 250_000
    transfers = [
        log for log in receipt["logs"] if log["topics"][0] == "0x" + TRANSFER_EVENT_TOPIC.hex()
    ]
    assert len(transfers) == 1
    assert to_checksum_address("0x" + transfers[0]["topics"][1][-40:]) == payer.address
    assert to_checksum_address("0x" + transfers[0]["topics"][2][-40:]) == pay_to
    assert int(transfers[0]["data"], 16) == 250_000
    state = local_chain.call(
        CANONICAL_USDC,
        encode_call("authorizationState(address,bytes32)", payer.address, message["nonce"]),
    )
    assert decode(["bool"], state) == (True,)

    # Replay of the very same authorization is refused with FiatToken's reason.
    replay = encode_call(TWA_VRS, *auth_args(message), v, r, s)
    expect_revert(local_chain, replay, REVERT_AUTHORIZATION_USED)
    assert local_chain.usdc_balance(pay_to) == 250_000


def test_bytes_overload_accepts_eoa_signature(
    local_chain: LocalChain, funded_payer: PayerFactory
) -> None:
    payer = funded_payer(usdc=1_000_000)
    pay_to = fresh_address()
    message = auth_message(local_chain, payer.address, pay_to, 1_000_000)
    v, r, s = sign_auth(payer.private_key, message)

    local_chain.send(
        CANONICAL_USDC, encode_call(TWA_BYTES, *auth_args(message), r + s + bytes([v]))
    )

    assert local_chain.usdc_balance(payer.address) == 0
    assert local_chain.usdc_balance(pay_to) == 1_000_000


@pytest.mark.parametrize("overload", ["vrs", "bytes"])
def test_high_s_twin_signature_is_rejected(
    local_chain: LocalChain, funded_payer: PayerFactory, overload: str
) -> None:
    payer = funded_payer()
    message = auth_message(local_chain, payer.address, fresh_address(), 1)
    v, r, s = sign_auth(payer.private_key, message)
    # The malleable twin (n - s, flipped v) recovers the same signer; USDC refuses it.
    high_s = (SECP256K1_N - int.from_bytes(s, "big")).to_bytes(32, "big")
    flipped_v = 55 - v
    if overload == "vrs":
        data = encode_call(TWA_VRS, *auth_args(message), flipped_v, r, high_s)
    else:
        data = encode_call(TWA_BYTES, *auth_args(message), r + high_s + bytes([flipped_v]))
    expect_revert(local_chain, data, REVERT_INVALID_SIGNATURE_S)


def test_refusals_carry_fiat_token_reasons(
    local_chain: LocalChain, funded_payer: PayerFactory
) -> None:
    payer = funded_payer(usdc=5)
    now = local_chain.latest_timestamp()
    pay_to = fresh_address()

    def signed(**overrides: Any) -> bytes:
        message = auth_message(local_chain, payer.address, pay_to, 5, **overrides)
        return encode_call(TWA_VRS, *auth_args(message), *sign_auth(payer.private_key, message))

    expect_revert(local_chain, signed(validAfter=now + 3600), REVERT_AUTHORIZATION_NOT_YET_VALID)
    expect_revert(local_chain, signed(validBefore=now - 1), REVERT_AUTHORIZATION_EXPIRED)
    expect_revert(local_chain, signed(value=6), REVERT_INSUFFICIENT_BALANCE)

    # Signed by someone else, or for other terms than submitted: invalid signature.
    message = auth_message(local_chain, payer.address, pay_to, 5)
    stranger = Account.create()
    forged = encode_call(
        TWA_VRS, *auth_args(message), *sign_auth("0x" + bytes(stranger.key).hex(), message)
    )
    expect_revert(local_chain, forged, REVERT_INVALID_SIGNATURE)
    v, r, s = sign_auth(payer.private_key, message)
    altered = encode_call(TWA_VRS, *auth_args({**message, "to": fresh_address()}), v, r, s)
    expect_revert(local_chain, altered, REVERT_INVALID_SIGNATURE)
    assert local_chain.usdc_balance(payer.address) == 5


def test_receive_with_authorization_only_by_the_payee(
    local_chain: LocalChain, funded_payer: PayerFactory
) -> None:
    payer = funded_payer(usdc=700)
    payee = funded_payer(usdc=0)  # has ETH for gas
    message = auth_message(local_chain, payer.address, payee.address, 700)
    vrs = sign_auth(payer.private_key, message, "ReceiveWithAuthorization")
    data = encode_call(RWA_VRS, *auth_args(message), *vrs)

    expect_revert(local_chain, data, REVERT_CALLER_NOT_PAYEE)
    local_chain.rpc("anvil_impersonateAccount", [payee.address])
    try:
        local_chain.send(CANONICAL_USDC, data, sender=payee.address)
    finally:
        local_chain.rpc("anvil_stopImpersonatingAccount", [payee.address])
    assert local_chain.usdc_balance(payee.address) == 700
    assert local_chain.usdc_balance(payer.address) == 0


def test_canceled_authorization_cannot_be_used(
    local_chain: LocalChain, funded_payer: PayerFactory
) -> None:
    payer = funded_payer(usdc=100)
    message = auth_message(local_chain, payer.address, fresh_address(), 100)
    cancel_vrs = sign_auth(
        payer.private_key,
        {"authorizer": payer.address, "nonce": message["nonce"]},
        "CancelAuthorization",
    )
    local_chain.send(
        CANONICAL_USDC, encode_call(CANCEL_VRS, payer.address, message["nonce"], *cancel_vrs)
    )
    data = encode_call(TWA_VRS, *auth_args(message), *sign_auth(payer.private_key, message))
    expect_revert(local_chain, data, REVERT_AUTHORIZATION_USED)
    assert local_chain.usdc_balance(payer.address) == 100


# ---------------------------------------------------------------------- EIP-1271 wallet payer


@pytest.mark.parametrize("overload", ["bytes", "vrs"])
def test_contract_wallet_pays_via_eip1271(
    local_chain: LocalChain, funded_payer: PayerFactory, overload: str
) -> None:
    owner = funded_payer(usdc=0, eth_wei=0)
    wallet = local_chain.deploy("TestWallet", owner.address)
    assert local_chain.rpc("eth_getCode", [wallet, "latest"]) not in ("0x", "")
    local_chain.fund(wallet, usdc=3_000_000)
    pay_to = fresh_address()

    def data_for(message: dict[str, Any], key: str) -> bytes:
        v, r, s = sign_auth(key, message)
        if overload == "vrs":  # like USDC v2.2, both overloads consult EIP-1271 for contracts
            return encode_call(TWA_VRS, *auth_args(message), v, r, s)
        return encode_call(TWA_BYTES, *auth_args(message), r + s + bytes([v]))

    # The owner signs the typed data whose `from` is the wallet.
    message = auth_message(local_chain, wallet, pay_to, 1_250_000)
    stranger_key = "0x" + bytes(Account.create().key).hex()
    expect_revert(local_chain, data_for(message, stranger_key), REVERT_INVALID_SIGNATURE)

    local_chain.send(CANONICAL_USDC, data_for(message, owner.private_key))
    assert local_chain.usdc_balance(wallet) == 3_000_000 - 1_250_000
    assert local_chain.usdc_balance(pay_to) == 1_250_000


# ---------------------------------------------------------------------- harness


def test_fund_adds_usdc_and_eth(local_chain: LocalChain) -> None:
    address = fresh_address()
    local_chain.fund(address, usdc=1_500_000, eth_wei=3)
    local_chain.fund(address, usdc=500_000, eth_wei=4)
    assert local_chain.usdc_balance(address) == 2_000_000
    assert local_chain.eth_balance(address) == 7


def test_accounts_are_anvils_deterministic_dev_keys(local_chain: LocalChain) -> None:
    accounts = local_chain.accounts
    assert len(accounts) == 20
    # Account 0 of the "test test ... junk" mnemonic, well known from anvil's banner.
    assert accounts[0].address == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    for address, key in [*accounts[:3], local_chain.harness_account]:
        assert Account.from_key(key).address == address
    assert local_chain.harness_account not in accounts
    assert local_chain.eth_balance(accounts[5].address) >= 10**21


def test_start_stop_context_manager_and_startup_time() -> None:
    with LocalChain() as chain:
        pid = chain.pid
        assert pid is not None and chain.running
        assert chain.startup_seconds is not None
        print(f"LocalChain.start() took {chain.startup_seconds * 1000:.0f} ms")
        assert chain.startup_seconds < 3.0
        assert call_str(chain, "name()") == "USD Coin"
        url = chain.rpc_url
    assert not chain.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone and reaped
    with socket.socket() as sock:
        port = int(url.rsplit(":", 1)[1])
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    chain.stop()  # idempotent


def test_explicit_port_and_block_time() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    chain = LocalChain(port=port, block_time=0.2)
    try:
        chain.start()
        assert chain.rpc_url == f"http://127.0.0.1:{port}"
        chain.fund(fresh_address(), usdc=1)  # waits for an interval-mined block
    finally:
        chain.stop()
    assert not chain.running


def test_failing_start_reports_anvils_reason() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        chain = LocalChain(port=busy.getsockname()[1])
        with pytest.raises(
            LocalChainError, match=r"(?s)exited with code [1-9].*Address already in use"
        ):
            chain.start()
    assert not chain.running


def test_anvil_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    found = find_anvil()
    assert Path(found).name == "anvil" and Path(found).parent.name != ".bin"
    with pytest.raises(LocalChainError, match="not an executable"):
        find_anvil(str(tmp_path / "missing-anvil"))
    monkeypatch.setenv("ANVIL_BIN", str(tmp_path / "nope"))
    with pytest.raises(LocalChainError, match=r"\$ANVIL_BIN"):
        LocalChain().start()
    monkeypatch.setenv("ANVIL_BIN", found)
    assert find_anvil() == found

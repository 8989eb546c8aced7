"""Chain adapter on a real Anvil: reads, the settlement simulation's reason mapping, receipts,
and every transport failure surfacing as InfrastructureError (never as an invalid payment)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak

from payments import reasons
from payments.chain import (
    Chain,
    ReceiptTimeout,
    encode_transfer,
    encode_transfer_with_authorization,
    reason_for_revert,
)
from payments.eip3009 import Authorization, sign_authorization
from payments.errors import InfrastructureError, InvalidPayment
from payments.networks import BASE
from payments.settler import Settler

from .conftest import USDC, Payer, authorization, requirement

pytestmark = pytest.mark.chain


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- pure calldata ---------------------------------------------------------------------------


def _auth() -> Authorization:
    return Authorization(
        from_="0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
        to="0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
        value=250_000,
        valid_after=1,
        valid_before=2**40,
        nonce=bytes(range(32)),
    )


def test_calldata_matches_the_abi_encoder() -> None:
    auth = _auth()
    sig = bytes(range(1, 65)) + b"\x1c"
    args = [auth.from_, auth.to, auth.value, auth.valid_after, auth.valid_before, auth.nonce]
    vrs = keccak(
        text="transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,"
        "uint8,bytes32,bytes32)"
    )[:4] + abi_encode(
        [
            "address",
            "address",
            "uint256",
            "uint256",
            "uint256",
            "bytes32",
            "uint8",
            "bytes32",
            "bytes32",
        ],
        [*args, 28, sig[:32], sig[32:64]],
    )
    assert encode_transfer_with_authorization(auth, sig) == vrs
    blob = bytes(range(200))  # an EIP-1271 wallet's signature can be any length
    by_bytes = keccak(
        text="transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
    )[:4] + abi_encode(
        ["address", "address", "uint256", "uint256", "uint256", "bytes32", "bytes"],
        [*args, blob],
    )
    assert encode_transfer_with_authorization(auth, blob, contract_wallet=True) == by_bytes
    assert encode_transfer(auth.to, 7) == keccak(text="transfer(address,uint256)")[:4] + (
        abi_encode(["address", "uint256"], [auth.to, 7])
    )


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("ERC20: transfer amount exceeds balance", reasons.INSUFFICIENT_BALANCE),
        ("FiatTokenV2: authorization is used or canceled", reasons.NONCE_ALREADY_USED),
        ("FiatTokenV2: authorization is not yet valid", reasons.VALID_AFTER_IN_FUTURE),
        ("FiatTokenV2: authorization is expired", reasons.VALID_BEFORE_EXPIRED),
        ("FiatTokenV2: invalid signature", reasons.INVALID_SIGNATURE),
        ("ECRecover: invalid signature 's' value", reasons.INVALID_SIGNATURE),
        ("Pausable: paused", reasons.SIMULATION_FAILED),
    ],
)
def test_revert_strings_map_to_x402_reasons(message: str, reason: str) -> None:
    assert reason_for_revert(message) == reason


# -- reads and simulation on Anvil ----------------------------------------------------------


async def test_reads(chain: Chain, make_payer: Callable[..., Payer]) -> None:
    payer = make_payer(usdc=3 * USDC)
    assert await chain.chain_id() == 8453
    assert len(await chain.code_at(BASE.usdc)) > 100
    assert await chain.code_at(payer.address) == b""
    assert await chain.balance_of(payer.address) == 3 * USDC
    assert await chain.eth_balance(payer.address) == 0
    assert await chain.authorization_state(payer.address, b"\x01" * 32) is False
    assert await chain.gas_price() > 0


async def _sim(chain: Chain, payer: Payer, auth: Authorization, sender: str) -> None:
    sig = sign_authorization(payer.key, BASE.token_domain, auth)
    await chain.simulate_transfer(auth, sig, sender)


async def test_simulation_reasons(
    chain: Chain, settler: Settler, make_payer: Callable[..., Payer]
) -> None:
    payer = make_payer(usdc=1 * USDC)
    req = requirement(settler.address, amount=250_000)
    now = int(time.time())
    await _sim(chain, payer, authorization(payer, req), settler.address)  # passes

    with pytest.raises(InvalidPayment) as info:
        await _sim(chain, payer, authorization(payer, req, value=2 * USDC), settler.address)
    assert info.value.reason == reasons.INSUFFICIENT_BALANCE

    with pytest.raises(InvalidPayment) as info:
        await _sim(chain, payer, authorization(payer, req, valid_after=now + 3600), settler.address)
    assert info.value.reason == reasons.VALID_AFTER_IN_FUTURE

    with pytest.raises(InvalidPayment) as info:
        await _sim(chain, payer, authorization(payer, req, valid_before=now - 10), settler.address)
    assert info.value.reason == reasons.VALID_BEFORE_EXPIRED

    auth = authorization(payer, req)
    other = make_payer(usdc=0)
    bad_sig = sign_authorization(other.key, BASE.token_domain, auth)  # signed by someone else
    with pytest.raises(InvalidPayment) as info:
        await chain.simulate_transfer(auth, bad_sig, settler.address)
    assert info.value.reason == reasons.INVALID_SIGNATURE

    # consume the authorization on chain, then simulate it again
    sig = sign_authorization(payer.key, BASE.token_domain, auth)
    tx = await settler.submit(auth, sig)
    await settler.confirm(tx, payer=payer.address, pay_to=settler.address, amount=auth.value)
    assert await chain.authorization_state(payer.address, auth.nonce) is True
    with pytest.raises(InvalidPayment) as info:
        await chain.simulate_transfer(auth, sig, settler.address)
    assert info.value.reason == reasons.NONCE_ALREADY_USED


async def test_receipt_and_transfer_logs(
    chain: Chain, settler: Settler, make_payer: Callable[..., Payer]
) -> None:
    payer = make_payer(usdc=USDC)
    req = requirement(settler.address, amount=123_456)
    auth = authorization(payer, req)
    tx = await settler.submit(auth, sign_authorization(payer.key, BASE.token_domain, auth))
    t0 = time.perf_counter()
    receipt = await chain.wait_receipt(tx, 10)
    waited = time.perf_counter() - t0
    assert receipt.succeeded and receipt.tx_hash == tx and receipt.block_number > 0
    [transfer] = chain.transfer_logs(receipt)
    assert (transfer.from_, transfer.to, transfer.value) == (
        payer.address,
        settler.address,
        123_456,
    )
    assert waited < 0.5, waited  # no flat 0.1 s sleeps stacking up
    assert await chain.transaction_known(tx)
    assert await chain.authorization_used_tx(payer.address, auth.nonce) == tx


async def test_receipt_timeout_is_infrastructure(chain: Chain) -> None:
    with pytest.raises(ReceiptTimeout) as info:
        await chain.wait_receipt("0x" + "ab" * 32, 0.2)
    assert isinstance(info.value, InfrastructureError)
    assert await chain.get_receipt("0x" + "ab" * 32) is None


# -- the node is down or sick -----------------------------------------------------------------


def _every_call(chain: Chain, payer: Payer) -> list[Callable[[], Awaitable[Any]]]:
    auth = _auth()
    return [
        lambda: chain.chain_id(),
        lambda: chain.balance_of(payer.address),
        lambda: chain.eth_balance(payer.address),
        lambda: chain.code_at(payer.address),
        lambda: chain.authorization_state(payer.address, b"\x00" * 32),
        lambda: chain.is_valid_signature_1271(payer.address, b"\x00" * 32, b"\x00" * 65),
        lambda: chain.simulate_transfer(auth, b"\x01" * 64 + b"\x1b", payer.address),
        lambda: chain.send_raw(b"\x02\x03"),
        lambda: chain.get_receipt("0x" + "00" * 32),
        lambda: chain.wait_receipt("0x" + "00" * 32, 1.0),
    ]


async def test_closed_port_is_infrastructure_error(make_payer: Callable[..., Payer]) -> None:
    payer = make_payer(usdc=0)
    async with Chain(f"http://127.0.0.1:{free_port()}", BASE.usdc, request_timeout=2) as down:
        t0 = time.perf_counter()
        for call in _every_call(down, payer):
            with pytest.raises(InfrastructureError) as info:
                await call()
            assert not isinstance(info.value, InvalidPayment)
        assert time.perf_counter() - t0 < 10


@pytest.fixture
async def sick_node() -> AsyncIterator[Callable[[str], str]]:
    """A local HTTP server answering like a broken RPC node, one behaviour per path."""

    async def error_500(request: web.Request) -> web.Response:
        return web.Response(status=500, text="upstream exploded")

    async def error_502(request: web.Request) -> web.Response:
        return web.Response(status=502, text="bad gateway")

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(status=200, text="<html>not json</html>")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.6)
        return web.json_response({"jsonrpc": "2.0", "id": 0, "result": "0x1"})

    async def rpc_error(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(
            {"jsonrpc": "2.0", "id": body["id"], "error": {"code": -32603, "message": "boom"}}
        )

    app = web.Application()
    for path, handler in {
        "/500": error_500,
        "/502": error_502,
        "/garbage": garbage,
        "/slow": slow,
        "/rpc-error": rpc_error,
    }.items():
        app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield lambda path: f"http://127.0.0.1:{port}{path}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("path", ["/500", "/502", "/garbage", "/slow", "/rpc-error"])
async def test_sick_node_is_infrastructure_error(
    sick_node: Callable[[str], str], path: str, make_payer: Callable[..., Payer]
) -> None:
    payer = make_payer(usdc=0)
    async with Chain(sick_node(path), BASE.usdc, request_timeout=0.15, read_retries=1) as sick:
        for call in _every_call(sick, payer):
            with pytest.raises(InfrastructureError) as info:
                await call()
            assert not isinstance(info.value, InvalidPayment)

"""Our facilitator service over real HTTP on a real chain: v1 and v2 bodies verify and settle
(balances read on Anvil), a retried settle moves money once, payment faults are answers with
the x402 reason, bad envelopes are 400, the bearer token guards /verify and /settle; and the
official x402 SDK's resource server, pointed at our service through its HTTPFacilitatorClient,
sells to the official client."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from fastapi import FastAPI
from pydantic import SecretStr
from x402 import x402Client, x402ResourceServer
from x402.http import FacilitatorConfig, HTTPFacilitatorClient, PaymentOption, RouteConfig
from x402.http.clients import x402HttpxClient
from x402.http.facilitator_client_base import AuthHeaders
from x402.http.middleware.fastapi import PaymentMiddlewareASGI
from x402.mechanisms.evm.exact import register_exact_evm_client, register_exact_evm_server

from gateway.cli import main
from gateway.facilitator_app import create_facilitator_app
from gateway.settings import Settings
from payments import BASE, decode_settle_response, reasons
from payments.facilitator import HANDED_OVER
from payments.ledger import NewPayment, SqliteLedger
from tests.facilitator.conftest import (
    ETH,
    TOKEN,
    Key,
    Service,
    new_key,
    requirements_v1,
    requirements_v2,
    signed_body,
)
from tests.fault_proxy import FaultProxy
from tests.gateway.server import ServerThread, free_port

pytestmark = pytest.mark.chain

PRICE = 10_000  # "$0.01"


def post(service: Service, path: str, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(
        service.url + path, json=body, headers={**service.auth, **headers}, timeout=30
    )


def test_supported_and_health_are_open(service: Service) -> None:
    r = httpx.get(service.url + "/supported")  # no token
    assert r.status_code == 200
    body = r.json()
    assert sorted((k["x402Version"], k["scheme"], k["network"]) for k in body["kinds"]) == [
        (1, "exact", "base"),
        (2, "exact", "eip155:8453"),
    ]
    assert all(k["extra"] == {"name": "USD Coin", "version": "2"} for k in body["kinds"])
    assert body["signers"] == {"eip155:*": [service.settler]}
    assert body["extensions"] == []

    health = httpx.get(service.url + "/healthz", params={"deep": "1"})
    assert health.status_code == 200
    assert health.json()["network"] == "eip155:8453"


@pytest.mark.parametrize("version", [2, 1])
def test_verify_settle_and_retry_move_money_once(
    version: int, service: Service, make_payer: Callable[..., Key], local_chain: Any
) -> None:
    payer, pay_to = make_payer(), new_key()
    make = requirements_v2 if version == 2 else requirements_v1
    body = signed_body(payer, make(pay_to.address, 42_000), version=version)
    network = "eip155:8453" if version == 2 else "base"
    before = local_chain.usdc_balance(payer.address)

    verdict = post(service, "/verify", body)
    assert verdict.status_code == 200
    assert verdict.json() == {"isValid": True, "payer": payer.address}
    assert local_chain.usdc_balance(payer.address) == before  # verify moves nothing

    first = post(service, "/settle", body)
    assert first.status_code == 200
    settled = first.json()
    assert settled["success"] is True, settled
    assert settled["payer"] == payer.address and settled["network"] == network
    assert settled["amount"] == "42000"
    tx = settled["transaction"]
    assert tx.startswith("0x") and len(tx) == 66
    receipt = local_chain.rpc("eth_getTransactionReceipt", [tx])
    assert int(receipt["status"], 16) == 1
    assert local_chain.usdc_balance(payer.address) == before - 42_000
    assert local_chain.usdc_balance(pay_to.address) == 42_000

    again = post(service, "/settle", body)  # a resource server retrying the same settle
    assert again.status_code == 200
    assert again.json() == settled
    assert local_chain.usdc_balance(payer.address) == before - 42_000
    assert local_chain.usdc_balance(pay_to.address) == 42_000
    # handed over: out of the pending set that start-up reconciliation reads
    assert service.ledger_rows(payer.address) == [("settled", tx, 42_000, HANDED_OVER)]

    spent = post(service, "/verify", body).json()  # the authorization is used now
    assert spent["isValid"] is False
    assert spent["invalidReason"] == reasons.NONCE_ALREADY_USED


def test_payment_faults_are_answers(
    service: Service, make_payer: Callable[..., Key], local_chain: Any
) -> None:
    payer, pay_to = make_payer(), new_key()
    req = requirements_v2(pay_to.address, 5_000)
    other_token = "0x" + "11" * 20
    cases = {
        reasons.INVALID_SIGNATURE: signed_body(payer, req, signer=new_key()),
        reasons.ASSET_MISMATCH: signed_body(
            payer, requirements_v2(pay_to.address, 5_000, asset=other_token)
        ),
        reasons.INVALID_NETWORK: signed_body(
            payer, requirements_v2(pay_to.address, 5_000, network="eip155:84532")
        ),
        reasons.VALID_BEFORE_EXPIRED: signed_body(payer, req, valid_before=1_000),
        reasons.UNSUPPORTED_SCHEME: signed_body(
            payer, requirements_v2(pay_to.address, 5_000, scheme="upto")
        ),
    }
    v1_wrong_network = signed_body(
        payer, requirements_v1(pay_to.address, 5_000, network="eip155:8453"), version=1
    )
    v1_wrong_asset = signed_body(
        payer, requirements_v1(pay_to.address, 5_000, asset=other_token), version=1
    )
    for reason, body in [
        *cases.items(),
        (reasons.INVALID_NETWORK, v1_wrong_network),
        (reasons.ASSET_MISMATCH, v1_wrong_asset),
    ]:
        verdict = post(service, "/verify", body)
        assert verdict.status_code == 200
        assert verdict.json()["isValid"] is False
        assert verdict.json()["invalidReason"] == reason, (reason, verdict.json())
        refused = post(service, "/settle", body)
        assert refused.status_code == 200
        answer = refused.json()
        assert answer["success"] is False and answer["errorReason"] == reason
        assert answer["transaction"] == "" and answer["network"] in ("eip155:8453", "base")

    # accepted (what the payer signed for) must equal the requirements the server sends
    body = signed_body(payer, req)
    body["paymentRequirements"] = requirements_v2(pay_to.address, 4_000)
    verdict = post(service, "/verify", body).json()
    assert verdict["invalidReason"] == reasons.AUTHORIZATION_VALUE_MISMATCH

    assert local_chain.usdc_balance(pay_to.address) == 0
    assert service.ledger_rows(payer.address) == []


def test_foreign_extra_keys_must_match(
    service: Service, make_payer: Callable[..., Key], local_chain: Any
) -> None:
    """Resource servers may add keys to `extra`; both sides must carry the same values."""
    payer, pay_to = make_payer(), new_key()
    req = requirements_v2(pay_to.address, 3_000)
    req["extra"] = {**req["extra"], "assetTransferMethod": "eip3009", "note": "x"}
    body = signed_body(payer, req)
    tampered = signed_body(payer, req)
    tampered["paymentRequirements"] = {**req, "extra": {**req["extra"], "note": "y"}}
    assert post(service, "/verify", tampered).json()["invalidReason"] == (
        reasons.INVALID_PAYMENT_REQUIREMENTS
    )
    assert post(service, "/settle", body).json()["success"] is True
    assert local_chain.usdc_balance(pay_to.address) == 3_000


def test_bad_envelopes_are_400(service: Service) -> None:
    for path in ("/verify", "/settle"):
        garbage = httpx.post(
            service.url + path,
            content=b"{not json",
            headers={**service.auth, "content-type": "application/json"},
        )
        assert garbage.status_code == 400
        key = "invalidReason" if path == "/verify" else "errorReason"
        assert garbage.json()[key] == reasons.INVALID_PAYLOAD

        for shape in (
            [1, 2],
            {"x402Version": 2},
            {"x402Version": "2", "paymentPayload": {}, "paymentRequirements": {}},
            {"x402Version": 2, "paymentPayload": "nope", "paymentRequirements": {}},
        ):
            r = post(service, path, shape)
            assert r.status_code == 400, (path, shape, r.text)
            assert r.json()[key] == reasons.INVALID_PAYLOAD

        dup = httpx.post(
            service.url + path,
            content=b'{"x402Version": 2, "x402Version": 1}',
            headers=service.auth,
        )
        assert dup.status_code == 400
        deep = httpx.post(service.url + path, content=b"[" * 5000, headers=service.auth)
        assert deep.status_code == 400
        big = httpx.post(service.url + path, content=b" " * (65 * 1024), headers=service.auth)
        assert big.status_code == 413

        # well-formed envelope, wrong version: a payment fault, answered 200
        r = post(service, path, {"x402Version": 3, "paymentPayload": {}, "paymentRequirements": {}})
        assert r.status_code == 200
        assert r.json()[key] == reasons.INVALID_X402_VERSION


def test_token_guards_verify_and_settle(
    service: Service, make_payer: Callable[..., Key], local_chain: Any
) -> None:
    payer, pay_to = make_payer(), new_key()
    body = signed_body(payer, requirements_v2(pay_to.address, 1_000))
    for path in ("/verify", "/settle"):
        missing = httpx.post(service.url + path, json=body)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = httpx.post(service.url + path, json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        basic = httpx.post(service.url + path, json=body, headers={"Authorization": TOKEN})
        assert basic.status_code == 401
    assert local_chain.usdc_balance(pay_to.address) == 0
    assert service.ledger_rows(payer.address) == []


def test_without_token_it_warns_and_stays_open(
    local_chain: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        _env_file=None,
        rpc_url=local_chain.rpc_url,
        settler_key=SecretStr(new_key().key),
        database=tmp_path / "open.db",
    )
    empty = {"x402Version": 2, "paymentPayload": {}, "paymentRequirements": {}}
    with caplog.at_level(logging.WARNING, logger="x402.facilitator"):
        server = ServerThread(create_facilitator_app(settings), free_port()).start()
        try:
            r = httpx.post(server.url + "/verify", json=empty, timeout=30)
        finally:
            server.stop()
    assert r.status_code == 200 and r.json()["isValid"] is False  # served without a token
    assert any("X402_FACILITATOR_TOKEN is not set" in m for m in caplog.messages)


def test_chain_outage_is_503_and_nothing_moves(
    local_chain: Any, tmp_path: Path, make_payer: Callable[..., Key]
) -> None:
    settler, payer, pay_to = new_key(), make_payer(), new_key()
    local_chain.fund(settler.address, eth_wei=ETH)
    proxy = FaultProxy.to(local_chain.rpc_url)
    settings = Settings(
        _env_file=None,
        rpc_url=proxy.url,
        rpc_timeout_seconds=2,
        settler_key=SecretStr(settler.key),
        database=tmp_path / "outage.db",
    )
    server = ServerThread(create_facilitator_app(settings), free_port()).start()
    body = signed_body(payer, requirements_v2(pay_to.address, 2_000))
    try:
        proxy.cut()
        for path in ("/verify", "/settle"):
            r = httpx.post(server.url + path, json=body, timeout=30)
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) > 0
            assert r.json()["error"] == "service_unavailable"
        assert httpx.get(server.url + "/healthz", params={"deep": "1"}).status_code == 503
        proxy.restore()
        settled = httpx.post(server.url + "/settle", json=body, timeout=30).json()
        assert settled["success"] is True  # the same body, retried once the chain is back
    finally:
        server.stop()
        proxy.stop()
    assert local_chain.usdc_balance(pay_to.address) == 2_000


def test_cli_refuses_to_start_without_a_settler_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.delenv("X402_SETTLER_KEY", raising=False)
    monkeypatch.delenv("X402_SETTLER_KEY_FILE", raising=False)
    assert main(["facilitator", "--port", str(free_port())]) == 2


# -- the official SDK's resource server on our facilitator ----------------------------------------


class _BearerAuth:
    def get_auth_headers(self) -> AuthHeaders:
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        return AuthHeaders(verify=bearer, settle=bearer)


@pytest.fixture(scope="module")
def official_server(service: Service) -> Iterator[tuple[str, str]]:
    """The SDK's FastAPI middleware selling `GET /weather` for $0.01, verifying and settling
    through OUR facilitator service (its HTTPFacilitatorClient, with our bearer token)."""
    pay_to = new_key().address
    facilitator = HTTPFacilitatorClient(
        FacilitatorConfig(url=service.url, timeout=30, auth_provider=_BearerAuth())
    )
    server = x402ResourceServer(facilitator)
    register_exact_evm_server(server, "eip155:8453")
    routes: Any = {
        "GET /weather": RouteConfig(
            accepts=PaymentOption(
                scheme="exact", pay_to=pay_to, price="$0.01", network="eip155:8453"
            ),
            description="today's weather",
            mime_type="application/json",
        )
    }
    app = FastAPI()
    app.add_middleware(PaymentMiddlewareASGI, routes=routes, server=server)

    @app.get("/weather")
    async def weather() -> dict[str, str]:
        return {"weather": "sunny"}

    thread = ServerThread(app, free_port()).start()
    try:
        yield thread.url, pay_to
    finally:
        thread.stop()


async def test_official_server_uses_our_facilitator(
    official_server: tuple[str, str],
    service: Service,
    make_payer: Callable[..., Key],
    local_chain: Any,
) -> None:
    url, pay_to = official_server
    payer = make_payer()
    before = local_chain.usdc_balance(payer.address)

    async with httpx.AsyncClient() as plain:
        unpaid = await plain.get(url + "/weather")
    assert unpaid.status_code == 402

    client = register_exact_evm_client(x402Client(), Account.from_key(payer.key))
    async with x402HttpxClient(client, timeout=30) as http:
        r = await http.get(url + "/weather")

    assert r.status_code == 200, r.text
    assert r.json() == {"weather": "sunny"}
    receipt = decode_settle_response(r.headers["payment-response"])
    assert receipt.success and receipt.payer == payer.address
    assert receipt.network == BASE.caip2
    assert local_chain.usdc_balance(payer.address) == before - PRICE
    assert local_chain.usdc_balance(pay_to) == PRICE
    assert service.ledger_rows(payer.address) == [
        ("settled", receipt.transaction, PRICE, HANDED_OVER)
    ]


async def test_a_settled_row_a_crash_left_is_handed_over_at_start_up(
    local_chain: Any, tmp_path: Path
) -> None:
    # Settled, then the process died before the row was marked handed over.
    database = tmp_path / "crashed.db"
    async with SqliteLedger(database) as ledger:
        row, _ = await ledger.reserve(
            NewPayment(
                chain_id=BASE.chain_id,
                asset=BASE.usdc,
                payer=new_key().address,
                nonce=os.urandom(32),
                amount=PRICE,
                pay_to=new_key().address,
                network=BASE.caip2,
                version=2,
                valid_before=2**40,
            )
        )
        await ledger.mark_settled(row.id, "0x" + "ab" * 32)
        assert [r.id for r in await ledger.pending()] == [row.id]
    settings = Settings(
        _env_file=None,
        rpc_url=local_chain.rpc_url,
        settler_key=SecretStr(new_key().key),
        database=database,
    )
    ServerThread(create_facilitator_app(settings), free_port()).start().stop()
    async with SqliteLedger(database) as ledger:
        assert await ledger.pending() == []  # start-up never reads it again
        after = await ledger.get(row.id)
    assert (after.state.value, after.task_id) == ("settled", HANDED_OVER)

"""Each spend-policy limit refuses BEFORE signing: the server sees no payment header, nothing is
committed, no USDC moves. Against real servers on Anvil."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from payments import BASE, BASE_SEPOLIA
from payments.client import Offer, Payer, PaymentRefused, SpendPolicy, receipt_of
from tests.client.conftest import Key, Served
from tests.client.servers import OFFICIAL_PRICE
from tests.gateway.conftest import new_key

pytestmark = pytest.mark.chain

BODY = {"prompt": "a kite over the dunes", "templateData": {"duration": 2}}


def quote(url: str) -> int:
    r = httpx.post(url + "/generation/create", json=BODY)
    assert r.status_code == 402, r.text
    return int(r.json()["accepts"][0]["maxAmountRequired"])


def declined(offers: list[Offer]) -> Callable[[Offer], bool]:
    def approve(offer: Offer) -> bool:
        offers.append(offer)
        return False

    return approve


POLICIES: dict[str, Callable[[int, list[Offer]], SpendPolicy]] = {
    "network_not_allowed": lambda amount, _: SpendPolicy(networks=(BASE_SEPOLIA,)),
    "asset_not_allowed": lambda amount, _: SpendPolicy(assets=frozenset({BASE_SEPOLIA.usdc})),
    "pay_to_not_allowed": lambda amount, _: SpendPolicy(pay_to=frozenset({new_key()[0]})),
    "amount_above_max": lambda amount, _: SpendPolicy(max_amount=amount - 1),
    "budget_exceeded": lambda amount, _: SpendPolicy(budget=amount - 1),
    "declined_by_approver": lambda amount, seen: SpendPolicy(approve=declined(seen)),
    "x402_version_not_allowed": lambda amount, _: SpendPolicy(versions=(1,)),
}


async def refused(payer: Payer, server: Served, method: str, path: str, **kw: Any) -> str:
    mark = server.recorder.mark()
    async with payer.async_client(base_url=server.url) as http:
        with pytest.raises(PaymentRefused) as info:
            await http.request(method, path, **kw)
    seen = server.recorder.since(mark)
    assert len(seen) == 1 and not seen[0].paid, seen  # the only request carried no signature
    assert payer.committed == 0 and payer.receipts == ()
    return info.value.reason


@pytest.mark.parametrize("reason", [r for r in POLICIES if r != "x402_version_not_allowed"])
async def test_gateway_limit_refuses_before_signing(
    reason: str, gateway: Served, make_key: Callable[..., Key], local_chain: Any
) -> None:
    key = make_key()
    amount = quote(gateway.url)
    offers: list[Offer] = []
    payer = Payer(key.key, POLICIES[reason](amount, offers))
    assert await refused(payer, gateway, "POST", "/generation/create", json=BODY) == reason
    assert local_chain.usdc_balance(key.address) == 10_000_000
    if reason == "declined_by_approver":  # the approver saw the real quote
        assert [(o.amount, o.pay_to, o.network) for o in offers] == [
            (amount, gateway.pay_to, "eip155:8453")
        ]


@pytest.mark.parametrize("reason", list(POLICIES))
async def test_official_server_limit_refuses_before_signing(
    reason: str, official: Served, make_key: Callable[..., Key], local_chain: Any
) -> None:
    key = make_key()
    payer = Payer(key.key, POLICIES[reason](OFFICIAL_PRICE, []))
    assert await refused(payer, official, "GET", "/weather") == reason
    assert local_chain.usdc_balance(key.address) == 10_000_000


async def test_budget_counts_every_signed_payment(
    gateway: Served, make_key: Callable[..., Key], local_chain: Any
) -> None:
    key = make_key()
    amount = quote(gateway.url)
    payer = Payer(key.key, SpendPolicy(budget=amount + amount // 2))
    mark = gateway.recorder.mark()
    async with payer.async_client(base_url=gateway.url) as http:
        first = await http.post("/generation/create", json=BODY)
        assert first.status_code == 202 and receipt_of(first) is not None
        assert payer.remaining_budget == amount // 2
        with pytest.raises(PaymentRefused) as info:
            await http.post("/generation/create", json=BODY)
    assert info.value.reason == "budget_exceeded"
    assert [s.paid for s in gateway.recorder.since(mark)] == [False, True, False]
    assert payer.committed == amount and len(payer.receipts) == 1
    assert local_chain.usdc_balance(key.address) == 10_000_000 - amount


def test_policy_is_checked_in_order_and_prefers_v2() -> None:
    """Pure: the cheapest acceptable offer of the preferred version wins; reasons are exact."""
    pay_to = new_key()[0]

    def offer(version: int, amount: int, **kw: Any) -> Offer:
        fields: dict[str, Any] = {
            "version": version,
            "scheme": "exact",
            "network": "eip155:8453" if version == 2 else "base",
            "amount": amount,
            "asset": BASE.usdc,
            "pay_to": pay_to,
            "max_timeout_seconds": 60,
            "extra": {"name": "USD Coin", "version": "2"},
            "resource": "http://x/",
            "description": "",
            "raw": {"amount": str(amount)},
        }
        fields.update(kw)
        return Offer(**fields)

    from payments.client import PaymentChallenge

    challenge = PaymentChallenge(
        v2=(offer(2, 900), offer(2, 500), offer(2, 100, scheme="upto")),
        v1=(offer(1, 50),),
        resource=None,
        extensions=None,
        error=None,
        detail=None,
    )
    payer = Payer("0x" + "11" * 32, SpendPolicy(max_amount=1000))
    chosen = payer.choose(challenge)
    assert (chosen.version, chosen.amount) == (2, 500)
    assert Payer("0x" + "11" * 32, SpendPolicy(versions=(1, 2))).choose(challenge).amount == 50
    with pytest.raises(PaymentRefused) as info:
        Payer("0x" + "11" * 32, SpendPolicy(max_amount=400, versions=(2,))).choose(challenge)
    assert info.value.reason == "unsupported_scheme"  # the cheapest v2 offer's reason
    with pytest.raises(PaymentRefused) as info:
        Payer("0x" + "11" * 32, SpendPolicy(max_amount=400, versions=(2,))).choose(
            PaymentChallenge(challenge.v2[:2], (), None, None, None, None)
        )
    assert info.value.reason == "amount_above_max" and info.value.offer is not None
    assert info.value.offer.amount == 500

"""The priced route's quote: validated, exact, and the same for the same body (cached only when
the body has no external inputs whose addresses must be checked again)."""

from __future__ import annotations

import json

import pytest

from gateway.errors import BadRequest
from gateway.pricing import load_price_book
from gateway.quoting import CreateGenerationRoute
from gateway.schemas import CreateGeneration
from payments import BASE

PAY_TO = "0x" + "ab" * 20


def route(inspected: list[CreateGeneration]) -> CreateGenerationRoute:
    async def inspect(body: CreateGeneration) -> bytes | None:
        inspected.append(body)
        return None

    return CreateGenerationRoute(
        load_price_book(),
        network=BASE,
        asset=BASE.usdc,
        pay_to=PAY_TO,
        max_timeout_seconds=60,
        available=lambda price: price.backend == "local",
        inspect=inspect,
    )


async def test_same_body_same_quote_and_requirements() -> None:
    seen: list[CreateGeneration] = []
    r = route(seen)
    body = json.dumps({"prompt": "p", "templateData": {"duration": 4}}).encode()
    first, second = await r.quote(body), await r.quote(body)
    assert first.amount == second.amount == 130_000
    assert len(seen) == 1  # the second came from the cache
    offered = r.requirements(first, "http://gw/generation/create")
    assert offered == r.requirements(second, "http://gw/generation/create")
    assert offered[0].amount == 130_000 and offered[0].pay_to.lower() == PAY_TO
    other = r.requirements(first, "https://public.example/generation/create")
    assert other[0].resource_url == "https://public.example/generation/create"


async def test_bodies_with_external_inputs_are_checked_every_time() -> None:
    seen: list[CreateGeneration] = []
    r = route(seen)
    body = json.dumps({"prompt": "p", "webhook": "https://hooks.example/x"}).encode()
    await r.quote(body)
    await r.quote(body)
    assert len(seen) == 2


async def test_invalid_bodies_are_never_cached() -> None:
    r = route([])
    for _ in range(2):
        with pytest.raises(BadRequest):
            await r.quote(b'{"prompt": ""}')

"""SSRF through the gateway: image and webhook URLs that lead to loopback, private, link-local,
multicast or metadata addresses are refused by a gateway started WITHOUT `allow_private_urls`.

Direct addresses and DNS names (`localhost`, numeric host forms) are refused before payment
(400, no challenge, nothing charged). A redirect can only be seen by fetching, which the gateway
does after payment: the hop to loopback is refused and the payment is refunded on chain. A
webhook never follows redirects. A trap server on loopback counts every request that reaches
it: it must stay at zero. (The suite's net guard makes sure no test here can send a packet off
the machine even if a refusal regressed.)
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from generation import AddressPolicy, ImageFetcher
from tests.gateway.server import ServerThread, free_port
from tests.reliability.facts import Recorder
from tests.reliability.harness import (
    USDC,
    InProcessGateway,
    signed_payment,
    start_inprocess,
    wait_status,
)


@dataclass
class Trap:
    """A loopback HTTP server that records every request; redirects on /redirect?to=."""

    hits: list[str] = field(default_factory=list)
    server: ServerThread | None = None

    def app(self) -> Starlette:
        async def anything(request: Request) -> Response:
            self.hits.append(f"{request.method} {request.url.path}")
            if request.url.path == "/redirect":
                if request.method == "POST" and len(self.hits) > 1:
                    return Response(status_code=204)  # a webhook's retry: end it, don't stall
                return RedirectResponse(request.query_params["to"], status_code=302)
            return Response(_png(), media_type="image/png")

        return Starlette(routes=[Route("/{path:path}", anything, methods=["GET", "POST", "HEAD"])])

    def start(self) -> Trap:
        self.server = ServerThread(self.app(), free_port()).start()
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def unsafe_urls(trap_port: int) -> list[tuple[str, str]]:
    """(category, URL): loopback ones point at the trap, so a leak would be counted."""
    p = trap_port
    return [
        ("loopback", f"http://127.0.0.1:{p}/x.png"),
        ("loopback", f"http://127.0.0.2:{p}/x.png"),
        ("loopback", f"http://127.1:{p}/x.png"),
        ("loopback", f"http://2130706433:{p}/x.png"),
        ("loopback", f"http://0x7f000001:{p}/x.png"),
        ("loopback", f"http://0177.0.0.1:{p}/x.png"),
        ("loopback", f"http://[::1]:{p}/x.png"),
        ("loopback", f"http://[::ffff:127.0.0.1]:{p}/x.png"),
        ("loopback", f"http://[2002:7f00:1::]:{p}/x.png"),  # 6to4 of 127.0.0.1
        ("loopback", f"https://127.0.0.1:{p}/x.png"),
        ("dns name", f"http://localhost:{p}/x.png"),
        ("unspecified", f"http://0.0.0.0:{p}/x.png"),
        ("unspecified", f"http://[::]:{p}/x.png"),
        ("private", "http://10.0.0.1/x.png"),
        ("private", "http://172.16.0.1/x.png"),
        ("private", "http://192.168.1.1/x.png"),
        ("private", "http://[fd12:3456::1]/x.png"),
        ("shared", "http://100.64.0.1/x.png"),
        ("link-local", "http://169.254.1.1/x.png"),
        ("link-local", "http://[fe80::1]/x.png"),
        ("multicast", "http://224.0.0.1/x.png"),
        ("multicast", "http://239.255.255.250/x.png"),
        ("multicast", "http://[ff02::1]/x.png"),
        ("broadcast", "http://255.255.255.255/x.png"),
        ("metadata", "http://169.254.169.254/latest/meta-data/"),
        ("metadata", "http://[::ffff:169.254.169.254]/latest/meta-data/"),
        ("metadata", "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/"),  # NAT64
        ("metadata", "http://[fd00:ec2::254]/latest/meta-data/"),
        ("metadata", "http://100.100.100.200/latest/meta-data/"),
        ("credentials", f"http://user:pass@127.0.0.1:{p}/x.png"),
    ]


@pytest.fixture(scope="module")
def trap() -> Iterator[Trap]:
    server = Trap().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def strict_gateway(
    local_chain: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessGateway]:
    gw = start_inprocess(
        local_chain,
        tmp_path_factory.mktemp("ssrf"),
        challenge_rate_per_ip=0,
        refusal_rate_per_payer=0,
    )
    assert gw.settings.allow_private_urls is False
    try:
        yield gw
    finally:
        gw.stop()


def test_unsafe_image_and_webhook_urls_are_refused_before_payment(
    strict_gateway: InProcessGateway, trap: Trap, facts: Recorder
) -> None:
    wrong: list[str] = []
    tried = 0
    with httpx.Client(base_url=strict_gateway.url, timeout=30) as http:
        for category, url in unsafe_urls(trap.port):
            for field_name, body in (
                ("templateData.image", {"prompt": "p", "templateData": {"image": url}}),
                ("webhook", {"prompt": "p", "webhook": url}),
            ):
                tried += 1
                r = http.post("/generation/create", json=body)
                fields = [e.get("field") for e in r.json().get("errors", [])]
                if r.status_code != 400 or "payment-required" in r.headers:
                    wrong.append(f"{category} {field_name} {url}: {r.status_code} {r.text[:150]}")
                elif field_name not in fields:
                    wrong.append(f"{category} {field_name} {url}: errors name {fields}")
    assert not wrong, "\n".join(wrong)
    assert trap.hits == []
    facts.record("inputs", suite="ssrf urls", target="gateway", count=tried, crashes=0, leaks=0)


async def test_unsafe_url_with_a_valid_payment_is_not_charged(
    strict_gateway: InProcessGateway, trap: Trap, local_chain: Any, make_payer: Any
) -> None:
    payer = make_payer()
    _, header = await signed_payment(strict_gateway.url, payer)  # a valid payment for BODY
    before = local_chain.usdc_balance(payer.address)
    async with httpx.AsyncClient(base_url=strict_gateway.url, timeout=30) as http:
        for url in (f"http://localhost:{trap.port}/x.png", "http://169.254.169.254/"):
            r = await http.post(
                "/generation/create",
                json={"prompt": "p", "templateData": {"duration": 1, "image": url}},
                headers={"PAYMENT-SIGNATURE": header},
            )
            assert r.status_code == 400, r.text
            assert r.json()["error"] == "invalid_input_url"
    assert local_chain.usdc_balance(payer.address) == before
    assert trap.hits == []


@pytest.fixture
def gateway_trusting_one_endpoint(
    local_chain: Any, tmp_path: Path, trap: Trap
) -> Iterator[tuple[InProcessGateway, Trap]]:
    """A strict gateway whose operator trusts exactly one loopback endpoint (the redirector).

    Settings have no per-endpoint allowlist yet, so the policy is set on the running services
    (the same `AddressPolicy.allowed_endpoints` an operator setting would fill)."""
    redirector = Trap().start()
    gw = start_inprocess(local_chain, tmp_path, challenge_rate_per_ip=0, refusal_rate_per_payer=0)
    services = gw.server.server.lifespan.state["services"]
    policy = AddressPolicy(allowed_endpoints=frozenset({("127.0.0.1", redirector.port)}))
    services.policy = policy
    services.images = ImageFetcher(policy=policy)
    try:
        yield gw, redirector
    finally:
        gw.stop()
        redirector.stop()


async def test_image_redirect_to_loopback_is_refused_and_refunded(
    gateway_trusting_one_endpoint: tuple[InProcessGateway, Trap],
    trap: Trap,
    local_chain: Any,
    make_payer: Any,
    facts: Recorder,
) -> None:
    gw, redirector = gateway_trusting_one_endpoint
    payer = make_payer(usdc=5 * USDC)
    leading_home = f"http://127.0.0.1:{trap.port}/x.png"
    body = {
        "prompt": "redirected",
        "templateData": {
            "duration": 1,
            "image": f"http://127.0.0.1:{redirector.port}/redirect?to={leading_home}",
        },
    }
    amount, header = await signed_payment(gw.url, payer, body)
    before = local_chain.usdc_balance(payer.address)
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
        r = await http.post("/generation/create", json=body, headers={"PAYMENT-SIGNATURE": header})
    # Today the redirect is only seen when fetching, after settlement: refused, then refunded.
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_image"
    assert "refunded" in r.json()["message"]
    assert redirector.hits == ["GET /redirect"]
    assert trap.hits == []
    assert local_chain.usdc_balance(payer.address) == before  # charged, then refunded
    facts.record(
        "ssrf_redirect",
        input="image",
        refused="refused after payment (the hop is only seen when fetching)",
        refunded=amount,
        leaks=len(trap.hits),
    )


async def test_webhook_never_follows_a_redirect(
    gateway_trusting_one_endpoint: tuple[InProcessGateway, Trap],
    trap: Trap,
    make_payer: Any,
    facts: Recorder,
) -> None:
    gw, redirector = gateway_trusting_one_endpoint
    payer = make_payer(usdc=5 * USDC)
    body = {
        "prompt": "hook",
        "templateData": {"duration": 1},
        "webhook": (
            f"http://127.0.0.1:{redirector.port}/redirect?to=http://127.0.0.1:{trap.port}/stolen"
        ),
    }
    _, header = await signed_payment(gw.url, payer, body)
    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
        r = await http.post("/generation/create", json=body, headers={"PAYMENT-SIGNATURE": header})
    assert r.status_code == 202, r.text
    await wait_status(gw.url, r.json()["taskId"], {"completed"})
    deadline = time.monotonic() + 20
    for _ in range(400):  # the hook goes out after the task completes; 20 s at most
        if redirector.hits or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert redirector.hits and all(h == "POST /redirect" for h in redirector.hits)
    assert trap.hits == []
    facts.record(
        "ssrf_redirect", input="webhook", refused="redirect not followed", leaks=len(trap.hits)
    )

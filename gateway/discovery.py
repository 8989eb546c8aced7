"""`GET /.well-known/x402`: every priced route, what it costs and how to call it.

Each entry is built from the route object the paywall uses, through the same calls: the
example price is `route.quote(input_example)`, its `accepts` are `route.requirements(...)`,
and `extensions.bazaar` / `outputSchema` come from the same `payments.Discovery` the 402
carries. So the document cannot disagree with a live 402 for the same body. The document's
JSON Schema ships with the package (`discovery.schema.json`) and is served at
`/.well-known/x402.schema.json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Scope

from gateway.errors import HTTPProblem
from gateway.middleware import Quote
from gateway.pricing import PriceBook
from payments import Discovery, Network, Requirement
from payments.amounts import format_usdc

__all__ = [
    "SCHEMA_PATH",
    "WELL_KNOWN_PATH",
    "Discoverable",
    "Listing",
    "discovery_document",
    "discovery_endpoint",
    "generation_price_rule",
    "published_schema",
    "schema_endpoint",
]

WELL_KNOWN_PATH = "/.well-known/x402"
SCHEMA_PATH = "/.well-known/x402.schema.json"
_CACHE = {"cache-control": "public, max-age=60"}


class Discoverable(Protocol):
    """A `PricedRoute` that also carries its `Discovery` (both route kinds of this product)."""

    method: str
    path: str
    description: str
    mime_type: str
    discovery: Discovery

    async def quote(self, body: bytes) -> Quote: ...

    def requirements(self, quote: Quote, resource_url: str) -> Sequence[Requirement]: ...


@dataclass(frozen=True)
class Listing:
    route: Discoverable
    price_rule: Mapping[str, Any]


@cache
def published_schema() -> dict[str, Any]:
    """The JSON Schema of the discovery document (a package file)."""
    text = resources.files("gateway").joinpath("discovery.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


async def discovery_document(
    listings: Sequence[Listing],
    *,
    network: Network,
    pay_to: str,
    resource_url: Callable[[str], str],
) -> dict[str, Any]:
    """The document for `listings`; `resource_url(path)` is what the 402 would name."""
    return {
        "x402Version": 2,
        "schema": SCHEMA_PATH,
        "payment": {
            "scheme": "exact",
            "network": network.caip2,
            "networkV1": network.name,
            "asset": network.usdc,
            "payTo": pay_to,
            "extra": {"name": network.token_name, "version": network.token_version},
        },
        "resources": [await _entry(listing, resource_url) for listing in listings],
    }


async def _entry(listing: Listing, resource_url: Callable[[str], str]) -> dict[str, Any]:
    route = listing.route
    disco = route.discovery
    url = resource_url(route.path)
    example_price: dict[str, str] | None = None
    example_resource: dict[str, str] | None = None
    accepts: list[dict[str, Any]] = []
    example = disco.input_example
    body = json.dumps(example).encode("utf-8") if example is not None and _has_body(disco) else b""
    if example is not None or not _has_body(disco):
        try:
            quote = await route.quote(body)
        except HTTPProblem:
            pass  # the example cannot be priced right now (a model switched off): no example
        else:
            offered = route.requirements(quote, url)
            accepts = [req.v2_dict() for req in offered]
            example_price = {"amount": str(quote.amount), "usdc": format_usdc(quote.amount)}
            first = offered[0]
            example_resource = {
                "url": first.resource_url,
                "description": first.description,
                "mimeType": first.mime_type,
            }
    entry: dict[str, Any] = {
        "resource": url,
        "method": route.method,
        "path": route.path,
        "description": route.description,
        "mimeType": route.mime_type,
        "price": dict(listing.price_rule),
        "examplePrice": example_price,
        "exampleResource": example_resource,  # the v2 `resource` of that 402
        "accepts": accepts,
        "input": {"schema": disco.input_schema, "example": example},
        "output": {"schema": disco.output_schema, "example": disco.output_example},
        "extensions": {"bazaar": disco.bazaar_extension()},
        "outputSchema": disco.v1_output_schema(),
    }
    return entry


def _has_body(disco: Discovery) -> bool:
    return disco.method in ("POST", "PUT", "PATCH")


def discovery_endpoint(
    listings: Callable[[], Sequence[Listing]],
    *,
    network: Network,
    pay_to: str,
    resource_url: Callable[[Scope], str],
) -> Callable[[Request], Any]:
    """A Starlette endpoint serving the document; `resource_url` is the paywall's own
    builder, applied as if the request had been made to each route's path."""

    async def endpoint(request: Request) -> Response:
        scope = request.scope

        def url_for(path: str) -> str:
            return resource_url({**scope, "path": path})

        document = await discovery_document(
            listings(), network=network, pay_to=pay_to, resource_url=url_for
        )
        return JSONResponse(document, headers=_CACHE)

    return endpoint


async def schema_endpoint(request: Request) -> Response:
    return JSONResponse(published_schema(), headers=_CACHE)


def generation_price_rule(prices: PriceBook) -> dict[str, Any]:
    """The generation gateway's rule: per model, base + per second (+ image surcharge)."""
    return {
        "currency": "USDC",
        "decimals": 6,
        "formula": (
            "base + perSecond * templateData.duration (+ imageSurcharge when templateData.image "
            "is set), by templateData.videoModel"
        ),
        "byModel": {
            name: {
                "base": format_usdc(price.base),
                "perSecond": format_usdc(price.per_second),
                "imageSurcharge": format_usdc(price.image_surcharge),
                "minDuration": price.min_duration,
                "maxDuration": price.max_duration,
                "default": name == prices.default_model,
            }
            for name, price in sorted(prices.models.items())
        },
    }

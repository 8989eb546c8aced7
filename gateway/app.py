"""`create_app(settings)`: the Starlette application and its lifespan.

Middleware order (outermost first): CORS (so 402 and errors carry CORS headers too), then the
x402 paywall, then the router. The lifespan owns every resource and reconciles payments and
tasks before uvicorn accepts the first request.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from gateway.cors import ALLOWED_HEADERS, EXPOSED_HEADERS, OriginOnlyCORS
from gateway.discovery import (
    SCHEMA_PATH,
    WELL_KNOWN_PATH,
    Listing,
    discovery_endpoint,
    generation_price_rule,
    schema_endpoint,
)
from gateway.errors import exception_handlers
from gateway.middleware import PaymentMiddleware, PaymentService
from gateway.payment_services import resolve_network, resolve_payee
from gateway.pricing import PriceBook, load_price_book
from gateway.quoting import CreateGenerationRoute
from gateway.ratelimit import buckets
from gateway.routes import create_generation, healthz, openapi, task_events, task_status
from gateway.services import Services, open_services
from gateway.settings import Settings
from gateway.urls import resource_url_builder

__all__ = ["create_app"]


def create_app(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    prices: PriceBook | None = None,
) -> Starlette:
    price_book = prices or load_price_book(settings.pricing_file)
    network = resolve_network(settings)
    settler_key, pay_to = resolve_payee(settings)  # no key needed with a remote facilitator
    holder: dict[str, Services] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with open_services(
            settings, price_book, settler_key=settler_key, pay_to=pay_to, clock=clock
        ) as services:
            holder["services"] = services
            try:
                yield {"services": services}
            finally:
                holder.clear()

    def services_of(scope: Scope) -> Services:
        return holder["services"]

    priced = CreateGenerationRoute(
        price_book,
        network=network,
        asset=network.usdc,
        pay_to=pay_to,
        max_timeout_seconds=settings.max_timeout_seconds,
        available=lambda price: holder["services"].model_available(price),
        inspect=lambda body: holder["services"].inspect_inputs(body),
    )

    def payment_service(scope: Scope) -> PaymentService:
        return services_of(scope).processor

    async def refund_unaccepted(scope: Scope, paid: Any) -> None:
        await services_of(scope).processor.refund(paid.settled.payment_id)

    resource_url = resource_url_builder(settings)
    listings = [Listing(priced, generation_price_rule(price_book))]
    routes = [
        Route("/generation/create", create_generation, methods=["POST"]),
        Route("/generation/{task_id}/status", task_status, methods=["GET"]),
        Route("/generation/{task_id}/events", task_events, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route(
            WELL_KNOWN_PATH,
            discovery_endpoint(
                lambda: listings, network=network, pay_to=pay_to, resource_url=resource_url
            ),
            methods=["GET"],
        ),
        Route(SCHEMA_PATH, schema_endpoint, methods=["GET"]),
        Mount(
            "/media",
            app=StaticFiles(directory=settings.media_dir, check_dir=False),
            name="media",
        ),
    ]
    middleware = [
        Middleware(
            OriginOnlyCORS,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=ALLOWED_HEADERS,
            expose_headers=EXPOSED_HEADERS,
        ),
        Middleware(
            PaymentMiddleware,
            routes=[priced],
            service=payment_service,
            resource_url=resource_url,
            max_body_bytes=settings.max_body_bytes,
            max_header_bytes=settings.max_payment_header_bytes,
            on_unaccepted=refund_unaccepted,
            challenge_limit=buckets(
                settings.challenge_rate_per_ip, settings.challenge_burst_per_ip
            ),
            refusal_limit=buckets(
                settings.refusal_rate_per_payer, settings.refusal_burst_per_payer
            ),
            admit=lambda scope, payment: services_of(scope).admit(payment.payer),
        ),
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers=exception_handlers(),
    )

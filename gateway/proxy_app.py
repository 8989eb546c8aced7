"""`create_proxy_app(settings)`: the gateway as a paywall in front of any HTTP API.

Middleware order (outermost first): CORS, then the x402 paywall over the priced routes of the
routes file, then a router that serves `/healthz` and discovery and forwards everything else
upstream. Unpriced requests are forwarded free or refused, by `settings.proxy_unpriced`.

Refund rule: a paid request the upstream did not answer below 500 (5xx, timeout, unreachable,
or nothing at all), or whose answer broke off mid-stream, is refunded on chain. A delivered one
is recorded in the ledger (the payment is linked to the marker `proxy:<status>`), so start-up
reconciliation refunds exactly the paid requests a crash left unanswered. A payment buys one
forwarded request: a replay of an authorization that was already delivered (or refunded) is
answered 409, never forwarded again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.cors import ALLOWED_HEADERS, EXPOSED_HEADERS, OriginOnlyCORS
from gateway.discovery import (
    SCHEMA_PATH,
    WELL_KNOWN_PATH,
    Listing,
    discovery_endpoint,
    schema_endpoint,
)
from gateway.errors import (
    HTTPProblem,
    MethodNotPriced,
    NotPriced,
    PaymentAlreadyUsed,
    PaymentRefunded,
    ServiceUnavailable,
    exception_handlers,
    problem_response,
)
from gateway.middleware import PAID_STATE_KEY, PaidRequest, PaymentMiddleware, PricedRoute
from gateway.payment_services import (
    PaymentServices,
    open_payments,
    payment_sweep,
    resolve_network,
    resolve_payee,
)
from gateway.proxy import Forwarder, new_upstream_client
from gateway.proxy_routes import ProxyRoute, RouteSpec, load_routes
from gateway.ratelimit import buckets
from gateway.settings import Settings, SettingsError
from gateway.urls import resource_url_builder
from payments.ledger import PaymentState

__all__ = ["DELIVERED_PREFIX", "PaymentAlreadyUsed", "create_proxy_app"]

log = logging.getLogger("x402.proxy")

DELIVERED_PREFIX = "proxy:"
_OWNER_KEY = "x402.proxy.owner"
_FORWARDING, _REFUNDING = "forwarding", "refunding"  # what _Deliveries is doing with a payment
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def create_proxy_app(
    settings: Settings,
    routes: Sequence[RouteSpec] | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    if not settings.proxy_upstream:
        raise SettingsError("proxy mode needs an upstream: --upstream URL or X402_PROXY_UPSTREAM")
    if routes is None:
        routes = load_routes(settings.proxy_routes_file) if settings.proxy_routes_file else []
    if not routes and settings.proxy_unpriced == "refuse":
        raise SettingsError(
            "no priced routes and unpriced routes refused: nothing to serve "
            "(give --routes FILE, or --unpriced pass)"
        )
    network = resolve_network(settings)
    settler_key, pay_to = resolve_payee(settings)  # no key needed with a remote facilitator
    secret = settings.proxy_secret.get_secret_value().encode() if settings.proxy_secret else None
    if secret is None and routes:
        log.warning("X402_PROXY_SECRET is not set: the X-X402-* payer headers go upstream unsigned")
    priced = [
        ProxyRoute(
            spec, network=network, pay_to=pay_to, max_timeout_seconds=settings.max_timeout_seconds
        )
        for spec in routes
    ]
    holder: dict[str, Any] = {}

    def money() -> PaymentServices:
        services: PaymentServices = holder["money"]
        return services

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with open_payments(
            settings, settler_key=settler_key, pay_to=pay_to, clock=clock
        ) as services:
            log.info("reconciled payments: %s", services.reconciled)
            holder["money"] = services
            try:
                await deliveries.refund_undelivered(services.reconciled.needs_task)
                async with (
                    new_upstream_client(settings.proxy_timeout_seconds) as client,
                    payment_sweep(services, deliveries.refund_undelivered),
                ):
                    holder["client"] = client
                    yield {}
            finally:
                holder.clear()

    forwarder = Forwarder(
        settings.proxy_upstream,
        client=lambda: holder["client"],
        secret=secret,
        trust_forwarded=settings.trust_forwarded_headers,
        clock=clock,
    )
    deliveries = _Deliveries(forwarder, money)
    endpoint = _ProxyEndpoint(deliveries, routes, refuse=settings.proxy_unpriced == "refuse")
    resource_url = resource_url_builder(settings)

    async def refund_unaccepted(scope: Scope, paid: PaidRequest) -> None:
        await deliveries.unaccepted(scope, paid)

    async def healthz(request: Request) -> Response:
        body = {"status": "ok", "mode": "proxy", "network": network.caip2}
        if request.query_params.get("deep"):
            try:
                await money().chain.chain_id()
            except Exception as exc:
                log.warning("health check: chain unreachable: %s", type(exc).__name__)
                return problem_response(
                    ServiceUnavailable("chain unreachable", reason="chain_unreachable")
                )
        return JSONResponse(body, headers={"cache-control": "no-store"})

    listings = [Listing(route, route.price_rule()) for route in priced]
    router_routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route(
            WELL_KNOWN_PATH,
            discovery_endpoint(
                lambda: listings, network=network, pay_to=pay_to, resource_url=resource_url
            ),
            methods=["GET"],
        ),
        Route(SCHEMA_PATH, schema_endpoint, methods=["GET"]),
        Route("/{path:path}", endpoint),
    ]

    # One set of rate-limit buckets shared by every paywall instance (templated routes get
    # one per request).
    challenge_limit = buckets(settings.challenge_rate_per_ip, settings.challenge_burst_per_ip)
    refusal_limit = buckets(settings.refusal_rate_per_payer, settings.refusal_burst_per_payer)

    def paywall(app: ASGIApp, offered: Sequence[PricedRoute]) -> ASGIApp:
        return PaymentMiddleware(
            app,
            routes=offered,
            service=lambda scope: money().processor,
            resource_url=resource_url,
            max_body_bytes=settings.max_body_bytes,
            max_header_bytes=settings.max_payment_header_bytes,
            on_unaccepted=refund_unaccepted,
            challenge_limit=challenge_limit,
            refusal_limit=refusal_limit,
        )

    middleware = [
        Middleware(
            OriginOnlyCORS,
            allow_origins=list(settings.cors_origins),
            allow_methods=_ALL_METHODS,
            allow_headers=[*ALLOWED_HEADERS, "*"],
            expose_headers=EXPOSED_HEADERS,
        ),
        Middleware(_Paywalls, routes=priced, paywall=paywall),
    ]
    return Starlette(
        routes=router_routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers=exception_handlers(),
    )


class _Paywalls:
    """`PaymentMiddleware` over the exact routes, plus one per request for a templated route
    (the paywall keys routes by exact path; binding a template to the path is cheap)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Sequence[ProxyRoute],
        paywall: Callable[[ASGIApp, Sequence[PricedRoute]], ASGIApp],
    ) -> None:
        self.app = app
        self.paywall = paywall
        exact = [r for r in routes if r.spec.pattern is None]
        self.exact_keys = {(r.method, r.path) for r in exact}
        self.exact = paywall(app, exact)
        self.templated = [r for r in routes if r.spec.pattern is not None]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.templated:
            method, path = scope["method"], scope["path"]
            if (method, path) not in self.exact_keys:
                for route in self.templated:
                    if route.method == method and route.spec.matches(path):
                        await self.paywall(self.app, [route.at(path)])(scope, receive, send)
                        return
        await self.exact(scope, receive, send)


class _Deliveries:
    """One payment buys one forwarded request; which request owns it, and its refund."""

    def __init__(self, forwarder: Forwarder, money: Callable[[], PaymentServices]) -> None:
        self.forwarder = forwarder
        self.money = money
        # payment id -> what is being done with it now: "forwarding" or "refunding"
        self.inflight: dict[str, str] = {}

    async def forward_paid(
        self, scope: Scope, receive: Receive, send: Send, paid: PaidRequest
    ) -> None:
        settled = paid.settled
        payment_id = settled.payment_id
        self._check_usable(payment_id, settled.state, task_id=None)
        if settled.replay:
            # The same authorization came back: was its request delivered meanwhile?
            row = await self.money().ledger.get(payment_id)
            self._check_usable(payment_id, row.state, task_id=row.task_id)
        self.inflight[payment_id] = _FORWARDING
        scope.setdefault("state", {})[_OWNER_KEY] = payment_id
        delivered: str | None = None  # the delivery recorded in the ledger

        async def send_marked(message: Message) -> None:
            nonlocal delivered
            if message["type"] == "http.response.start" and message["status"] < 500:
                # Recorded before the client sees anything: a crash after this point leaves a
                # delivered payment, never a refund for an answered request.
                marker = f"{DELIVERED_PREFIX}{message['status']}"
                await self.money().processor.link_task(payment_id, marker)
                delivered = marker
            await send(message)

        try:
            whole = await self.forwarder.forward(scope, receive, send_marked)
            if delivered is not None and not whole:
                # The upstream broke off mid-answer: the client got a cut connection, not
                # what it paid for. Not delivered after all (recorded first, so a refund that
                # fails now is retried by the sweep and at start-up), then refunded.
                self.inflight[payment_id] = _REFUNDING
                try:
                    await self.money().processor.unlink_task(payment_id, delivered)
                except Exception:  # the ledger is down: refund now all the same
                    log.exception("could not record payment %s as undelivered", payment_id)
                await _refund_quietly(self.money(), payment_id)
        finally:
            if delivered is not None:
                self.inflight.pop(payment_id, None)

    def _check_usable(self, payment_id: str, state: PaymentState, *, task_id: str | None) -> None:
        doing = self.inflight.get(payment_id)
        if doing == _REFUNDING:
            raise PaymentRefunded("this payment is being refunded; sign a new payment")
        if doing == _FORWARDING:
            raise PaymentAlreadyUsed("this payment's request is being forwarded now")
        if state is not PaymentState.SETTLED:
            raise PaymentRefunded("this payment was refunded; sign a new payment")
        if task_id is not None:
            raise PaymentAlreadyUsed(
                "this payment already bought a request that was delivered; sign a new payment"
            )

    async def refund_undelivered(self, payment_ids: list[str]) -> None:
        """Settled payments with no delivery recorded (a crash mid-request, or a payer whose
        answer was lost and who never came back): the request cannot be replayed by us, so the
        money goes back. A payment being forwarded right now is left to its request; one
        claimed here is refused to a replay meanwhile (409), then refunded."""
        for payment_id in payment_ids:
            if payment_id in self.inflight:
                continue
            self.inflight[payment_id] = _REFUNDING
            try:
                row = await self.money().ledger.get(payment_id)
                if row.state is PaymentState.SETTLED and row.task_id is None:
                    await _refund_quietly(self.money(), payment_id)
            finally:
                self.inflight.pop(payment_id, None)

    async def unaccepted(self, scope: Scope, paid: PaidRequest) -> None:
        """Paid, but not answered below 500: refund, if this request owned the payment (a
        refused replay did not; its owner, or start-up reconciliation, decides)."""
        payment_id = paid.settled.payment_id
        if scope.get("state", {}).get(_OWNER_KEY) != payment_id:
            return
        self.inflight[payment_id] = _REFUNDING
        try:
            await _refund_quietly(self.money(), payment_id)
        finally:
            self.inflight.pop(payment_id, None)


async def _refund_quietly(services: PaymentServices, payment_id: str) -> None:
    try:
        row = await services.processor.refund(payment_id)
        log.info("refunded undelivered payment=%s tx=%s", payment_id, row.refund_tx)
    except Exception:
        # Still settled with no delivery recorded: the payment sweep (and start-up) refunds it.
        log.exception("refund of payment %s failed; retried later", payment_id)


class _ProxyEndpoint:
    """The router's catch-all: paid requests forwarded once, unpriced ones by policy."""

    def __init__(self, deliveries: _Deliveries, specs: Sequence[RouteSpec], *, refuse: bool):
        self.deliveries = deliveries
        self.specs = specs
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        paid = scope.get("state", {}).get(PAID_STATE_KEY)
        if isinstance(paid, PaidRequest):
            await self.deliveries.forward_paid(scope, receive, send, paid)
        elif self.refuse:
            await problem_response(self._refusal(scope["method"], scope["path"]))(
                scope, receive, send
            )
        else:
            await self.deliveries.forwarder(scope, receive, send)

    def _refusal(self, method: str, path: str) -> HTTPProblem:
        allowed = sorted({s.method for s in self.specs if s.matches(path)})
        if allowed:
            return MethodNotPriced(
                f"{path} is sold for {', '.join(allowed)} only",
                headers={"allow": ", ".join(allowed)},
            )
        return NotPriced(
            f"this gateway forwards priced routes only; {method} {path} is not one "
            f"(see {WELL_KNOWN_PATH})"
        )

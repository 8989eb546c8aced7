"""The money half of the composition root: chain adapter, ledger, settler and processor, opened,
started and reconciled together. Every face of the product builds on it: the generation
gateway, proxy mode and the facilitator service.

With ``settings.facilitator_url`` the processor verifies and settles through that remote
facilitator; the settler key is then optional (no hot wallet), and without one refunds cannot
be sent (``resolve_payee`` requires ``pay_to`` instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from eth_account import Account

from gateway.faults import checkpoint_for
from gateway.settings import Settings, SettingsError
from payments import Network, get_network
from payments.chain import Chain
from payments.eip3009 import normalize_address
from payments.ledger import SqliteLedger
from payments.processor import PaymentProcessor, ReconcileReport
from payments.remote_facilitator import RemoteFacilitator, parse_auth_header
from payments.settler import Settler

__all__ = [
    "PaymentServices",
    "open_payments",
    "payment_sweep",
    "resolve_network",
    "resolve_payee",
]

log = logging.getLogger("x402.gateway")


@dataclass
class PaymentServices:
    settings: Settings
    network: Network
    pay_to: str
    chain: Chain
    ledger: SqliteLedger
    processor: PaymentProcessor
    settler_address: str  # "" when there is no settler key (remote facilitator mode)
    reconciled: ReconcileReport = field(default_factory=ReconcileReport)


def resolve_network(settings: Settings) -> Network:
    base = get_network(settings.network)
    if settings.asset is None and settings.chain_id is None:
        return base
    return Network(
        name=base.name,
        caip2=f"eip155:{settings.chain_id or base.chain_id}",
        chain_id=settings.chain_id or base.chain_id,
        usdc=settings.asset or base.usdc,
        token_name=settings.token_name or base.token_name,
        token_version=settings.token_version or base.token_version,
    )


def resolve_payee(settings: Settings) -> tuple[str | None, str]:
    """``(settler key or None, pay_to)``. The key is required unless a remote facilitator
    settles (then ``pay_to`` is, since there is no settler address to default to)."""
    remote = settings.facilitator_url is not None
    if remote and settings.facilitator_auth_header is not None:
        try:
            parse_auth_header(settings.facilitator_auth_header.get_secret_value())
        except ValueError as exc:
            raise SettingsError(f"X402_FACILITATOR_AUTH_HEADER: {exc}") from None
    key: str | None = None
    if not remote or settings.settler_key is not None or settings.settler_key_file is not None:
        key = settings.load_settler_key()
    if settings.pay_to:
        try:
            return key, normalize_address(settings.pay_to)
        except ValueError as exc:
            raise SettingsError(f"X402_PAY_TO is not an address: {exc}") from None
    if key is None:
        raise SettingsError(
            "remote facilitator mode without a settler key needs X402_PAY_TO (the address paid)"
        )
    return key, normalize_address(Account.from_key(key).address)


@asynccontextmanager
async def open_payments(
    settings: Settings,
    *,
    settler_key: str | None,
    pay_to: str,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[PaymentServices]:
    """Open, start and reconcile; the caller resolves ``reconciled.needs_task`` (its own work)
    before serving. In-flight settlements are drained on the way out."""
    network = resolve_network(settings)
    settings.database.parent.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        chain = Chain(settings.rpc_url, network.usdc, request_timeout=settings.rpc_timeout_seconds)
        stack.push_async_callback(chain.close)
        ledger = await SqliteLedger(settings.database).open()
        stack.push_async_callback(ledger.close)
        settler = Settler(chain, settler_key) if settler_key is not None else None
        remote: RemoteFacilitator | None = None
        if settings.facilitator_url is not None:
            auth = settings.facilitator_auth_header
            remote = RemoteFacilitator(
                settings.facilitator_url,
                auth_header=auth.get_secret_value() if auth is not None else None,
                timeout_s=settings.facilitator_timeout_seconds,
                retries=settings.facilitator_retries,
            )
            stack.push_async_callback(remote.aclose)
        processor = PaymentProcessor(
            chain,
            settler,
            ledger,
            clock,
            settle_margin_s=settings.settle_margin_seconds,
            checkpoint=checkpoint_for(settings),  # a no-op unless dev-mode fault injection is on
            facilitator=remote,
        )
        await processor.start()
        report = await processor.reconcile()
        stack.push_async_callback(processor.drain)
        yield PaymentServices(
            settings=settings,
            network=network,
            pay_to=pay_to,
            chain=chain,
            ledger=ledger,
            processor=processor,
            settler_address=settler.address if settler is not None else "",
            reconciled=report,
        )


@asynccontextmanager
async def payment_sweep(
    services: PaymentServices, resolve: Callable[[list[str]], Awaitable[None]]
) -> AsyncIterator[None]:
    """While the body runs: every ``payment_sweep_interval_seconds``, reconcile the payments
    no request has touched for ``payment_sweep_idle_seconds``, as start-up does, and hand the
    settled ones without delivered work to ``resolve`` (the face's own work-or-refund; not
    called without a settler key, as nothing could be sent back). A payer whose answer was
    lost, and who never retries, thus gets the money back in minutes, not at the next
    restart."""
    interval = services.settings.payment_sweep_interval_seconds
    if not interval:
        yield
        return
    idle_ms = services.settings.payment_sweep_idle_seconds * 1000

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                report = await services.processor.reconcile(idle_for_ms=idle_ms)
                if services.settler_address:  # without a key, owed refunds wait for one
                    await resolve(report.needs_task)
                if report.settled or report.failed or report.refunded or report.released:
                    log.info("payment sweep: %s", report)
            except Exception:
                log.exception("payment sweep failed; again in %d s", interval)

    sweeper = asyncio.create_task(sweep_forever())
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper

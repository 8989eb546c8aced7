"""The money half of the composition root: chain adapter, ledger, settler and processor, opened,
started and reconciled together. Every face of the product builds on it: the generation
gateway, proxy mode and the facilitator service.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from gateway.faults import checkpoint_for
from gateway.settings import Settings
from payments import Network, get_network
from payments.chain import Chain
from payments.ledger import SqliteLedger
from payments.processor import PaymentProcessor, ReconcileReport
from payments.settler import Settler

__all__ = ["PaymentServices", "open_payments", "resolve_network"]


@dataclass
class PaymentServices:
    settings: Settings
    network: Network
    pay_to: str
    chain: Chain
    ledger: SqliteLedger
    processor: PaymentProcessor
    settler_address: str
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


@asynccontextmanager
async def open_payments(
    settings: Settings,
    *,
    settler_key: str,
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
        settler = Settler(chain, settler_key)
        processor = PaymentProcessor(
            chain,
            settler,
            ledger,
            clock,
            settle_margin_s=settings.settle_margin_seconds,
            checkpoint=checkpoint_for(settings),  # a no-op unless dev-mode fault injection is on
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
            settler_address=settler.address,
            reconciled=report,
        )

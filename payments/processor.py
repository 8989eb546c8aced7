"""PaymentProcessor: the one facade the gateway calls to turn a payment header into money.

``pay()`` runs, in order: decode -> match -> ``verify_offline`` -> (EIP-1271 when the ECDSA
signer is not ``from`` and ``from`` has code) -> ``eth_call`` simulation -> reserve in the ledger
-> sign + record the tx hash -> broadcast -> receipt + Transfer-log check -> settled.

RPC round trips per paid request (EOA payer, warm caches): 1 ``eth_call`` (simulation) + 1
``eth_sendRawTransaction`` + the settler's mined-nonce polls (shared by every settlement waiting
at the time; 1-3 at concurrency 1 on Anvil) + exactly 1 receipt, fetched once the nonce count
shows the tx mined. No balance/gas-price reads per request (the simulation covers balance,
authorization nonce and validity; the settler caches nonce and fees). A contract wallet adds
``eth_getCode`` + ``isValidSignature``. Ledger: 3 durable writes (reserve, submitted, settled),
0 reads.

Idempotency: the ledger's unique key ``(chain_id, asset, payer, nonce)`` decides who settles.
In this process, concurrent requests carrying the same authorization share one settlement task
(keyed by that tuple, registered before the first await); later ones find the ledger row. Either
way a replay gets the first outcome (same payment id and tx, ``replay=True``; or the same
failure reason) and nothing is sent twice. A replay needs a valid signature: seeing a payment on
chain is not enough to fetch its outcome.

Failure policy (the reservation is released ONLY when provably nothing was broadcast):
- payment faults -> ``InvalidPayment`` (402), nothing reserved;
- RPC/DB faults before the broadcast, or a send the node refused -> reservation released,
  ``InfrastructureError`` (503); the payer may retry with the same header;
- transport failure during the broadcast, receipt timeout -> the row stays ``submitted``,
  ``InfrastructureError``; a retry of the same header, or ``reconcile()``, resolves it from the
  receipt, the node's mempool or the token's ``authorizationState``;
- reverted / wrong Transfer -> row ``failed(reason)``, ``SettlementFailed``.

The settlement itself runs in a task shielded from the request: a client that disconnects
mid-settlement cannot leave the ledger half-way.

Remote facilitator mode (``facilitator=RemoteFacilitator``; the settler key is then optional):
the same offline checks, then the facilitator's ``/verify`` instead of the simulation; reserve
in the ledger first, as always; then its ``/settle``. Its answer is checked on chain before the
row is settled (``reserved -> submitted(tx) -> settled``, the receipt must hold the Transfer).
- a refusal -> ``failed(reason)``, ``SettlementFailed`` (402) -- unless the chain shows the
  authorization used (then it settled, by that tx), or an earlier attempt may still be mined
  (a lost answer, or a refusal that may follow a broadcast such as ``transaction_failed``):
  then the row stays ``reserved`` and the answer is 503 until the chain or the authorization's
  expiry decides;
- no answer (transport, timeout, 5xx): the row stays ``reserved`` (released only when no
  attempt can have reached the facilitator), ``InfrastructureError`` (503). A retry of the
  same header asks the chain first, then ``/settle`` again: the token refuses a used nonce, so
  this can never move the money twice, and a "nonce already used" answer is resolved from the
  chain (``AuthorizationUsed`` log -> receipt -> Transfer).
- ``reconcile()``: such a ``reserved`` row is settled from the chain if the authorization was
  used, failed once it expired unused, and left for later otherwise (never released: the
  facilitator may still broadcast it).
- no settler key: ``refund`` raises ``InfrastructureError``; the payment stays ``settled`` and
  is logged as owed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from payments import reasons
from payments.chain import Chain
from payments.eip3009 import Authorization, normalize_address, recover_signer
from payments.errors import InfrastructureError, InvalidPayment, PaymentError, SettlementFailed
from payments.keyed_lock import KeyedLock
from payments.ledger import (
    IllegalTransition,
    Ledger,
    LedgerError,
    NewPayment,
    PaymentRecord,
    PaymentState,
)
from payments.networks import Network
from payments.remote_facilitator import (
    FacilitatorUnavailable,
    Refusal,
    RemoteFacilitator,
    Settlement,
)
from payments.requirements import Requirement
from payments.settler import SendRejected, SendUncertain, Settler
from payments.verify import DEFAULT_SETTLE_MARGIN_S, Payment, match_requirement, verify_offline
from payments.wire import SettleResponse, decode_payment_header

__all__ = ["PaymentProcessor", "ReconcileReport", "Settled", "Verified"]

log = logging.getLogger(__name__)

_Key = tuple[int, str, str, bytes]

# Verify failures that may just mean "this authorization was already spent here": look for a
# replay before answering 402. A simulation revert comes after the signature was verified; a
# clock failure stops the offline checks before the signature, so it is checked on its own.
_REPLAY_SIM_REASONS: Final = frozenset(
    {reasons.NONCE_ALREADY_USED, reasons.INSUFFICIENT_BALANCE, reasons.SIMULATION_FAILED}
)
_REPLAY_TIME_REASONS: Final = frozenset(
    {reasons.VALID_BEFORE_EXPIRED, reasons.VALID_AFTER_IN_FUTURE}
)
_SETTLED_STATES: Final = frozenset(
    {PaymentState.SETTLED, PaymentState.REFUND_SUBMITTED, PaymentState.REFUNDED}
)
# Facilitator refusals that may come after its transaction was broadcast (a revert, a receipt
# timeout, a send error): that transaction may still be mined, so they are not final.
_MAYBE_SENT_REASONS: Final = frozenset(
    {
        reasons.TRANSACTION_FAILED,
        reasons.UNEXPECTED_SETTLE_ERROR,
        reasons.INVALID_TRANSACTION_STATE,
        reasons.TRANSFER_EVENT_MISMATCH,
        "settlement_pending",
    }
)
_TX_HASH: Final = re.compile(r"0x[0-9a-fA-F]{64}")


@dataclass(frozen=True, slots=True)
class Verified:
    """A payment that passed every check, including the on-chain simulation."""

    payment: Payment
    contract_wallet: bool

    @property
    def payer(self) -> str:
        return self.payment.payer


@dataclass(frozen=True, slots=True)
class Settled:
    """The outcome of a paid request. ``version``/``network`` are those of THIS request (a v1
    replay of a v2 payment answers in v1)."""

    payment_id: str
    payer: str
    amount: int
    tx_hash: str
    network: Network
    version: int
    replay: bool
    task_id: str | None
    state: PaymentState = PaymentState.SETTLED

    def settle_response(self) -> SettleResponse:
        """Body of PAYMENT-RESPONSE (v2) / X-PAYMENT-RESPONSE (v1)."""
        return SettleResponse(
            success=True,
            transaction=self.tx_hash,
            network=self.network.caip2 if self.version == 2 else self.network.name,
            payer=self.payer,
        )


@dataclass(slots=True)
class ReconcileReport:
    settled: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    refunded: list[str] = field(default_factory=list)
    needs_task: list[str] = field(default_factory=list)  # settled, no task: run it or refund
    released: list[str] = field(default_factory=list)  # reserved, never sent: free to retry
    unresolved: list[str] = field(default_factory=list)  # still pending on chain; retry later


def _no_checkpoint(name: str) -> None:
    """Fault-injection hook (tests kill the process at named steps); a no-op in production."""


def _key(auth: Authorization, chain_id: int, asset: str) -> _Key:
    return (chain_id, asset, auth.from_, auth.nonce)


class _RemoteInvalid(InvalidPayment):
    """The facilitator's /verify refused a payment our offline checks (signature included)
    passed: it may be a replay of one settled here, so the ledger is looked up first."""


class PaymentProcessor:
    def __init__(
        self,
        chain: Chain,
        settler: Settler | None,
        ledger: Ledger,
        clock: Callable[[], float] = time.time,
        *,
        settle_margin_s: int = DEFAULT_SETTLE_MARGIN_S,
        log_lookback_blocks: int = 50_000,
        checkpoint: Callable[[str], None] = _no_checkpoint,
        facilitator: RemoteFacilitator | None = None,
        receipt_timeout_s: float = 30.0,
    ) -> None:
        if settler is None and facilitator is None:
            raise ValueError("a processor needs a settler, a remote facilitator, or both")
        self._chain = chain
        self._settler = settler
        # eth_call sender of the simulation (local mode only)
        self._sim_sender = settler.address if settler is not None else ""
        self._remote = facilitator
        self._receipt_timeout_s = receipt_timeout_s
        self._ledger = ledger
        self._clock = clock
        self._settle_margin_s = settle_margin_s
        self._lookback = log_lookback_blocks
        self._checkpoint = checkpoint
        self._inflight: dict[_Key, asyncio.Task[Settled]] = {}
        self._refund_locks = KeyedLock()
        self._chain_id: int | None = None

    async def start(self) -> None:
        """Warm caches (chain id, settler nonce and fees). Call from the app's lifespan."""
        self._chain_id = await self._chain.chain_id()
        if self._settler is not None:
            await self._settler.start()
        if self._remote is not None:
            await self._check_facilitator(self._remote)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Let in-flight settlements finish (graceful shutdown)."""
        tasks = list(self._inflight.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    def _now(self) -> int:
        return int(self._clock())

    # -- verify ----------------------------------------------------------------------------------

    def decode(
        self,
        header_value: str,
        offered: Sequence[Requirement],
        *,
        version_hint: Literal[1, 2] | None = None,
    ) -> Payment:
        """Decode and bind to an offered requirement (pure; InvalidPayment on any mismatch)."""
        payment = match_requirement(
            decode_payment_header(header_value, version=version_hint), offered
        )
        req = payment.requirement
        if req.asset != self._chain.token:
            raise InvalidPayment(
                reasons.ASSET_MISMATCH, f"this gateway settles {self._chain.token}"
            )
        return payment

    async def _chain_id_checked(self, network: Network) -> int:
        if self._chain_id is None:
            self._chain_id = await self._chain.chain_id()
        if network.chain_id != self._chain_id:
            raise InvalidPayment(
                reasons.INVALID_NETWORK, f"this gateway settles on chain {self._chain_id}"
            )
        return self._chain_id

    async def _check_signature(self, payment: Payment, *, now: int) -> bool:
        """Offline checks + EIP-1271 fallback. Returns True for a contract wallet."""
        signer = verify_offline(payment, now=now, settle_margin_s=self._settle_margin_s)
        if signer is not None:
            return False
        payer = payment.payer
        if not await self._chain.code_at(payer):
            raise InvalidPayment(reasons.INVALID_SIGNATURE, "signature is not from the payer")
        if not await self._chain.is_valid_signature_1271(payer, payment.digest, payment.signature):
            raise InvalidPayment(reasons.INVALID_SIGNATURE, "the payer's wallet (EIP-1271) refused")
        return True

    async def _signature_ok(self, payment: Payment) -> bool:
        """Is the authorization really signed by ``from`` (ECDSA or EIP-1271)? No clock."""
        if recover_signer(payment.digest, payment.signature) == payment.payer:
            return True
        if not await self._chain.code_at(payment.payer):
            return False
        return await self._chain.is_valid_signature_1271(
            payment.payer, payment.digest, payment.signature
        )

    async def _replay_check(self, payment: Payment) -> None:
        """What a replay must pass: every offline check, the clock excepted, and the signature."""
        try:
            await self._check_signature(payment, now=self._now())
        except InvalidPayment as exc:
            if exc.reason not in _REPLAY_TIME_REASONS:
                raise
            if not await self._signature_ok(payment):
                raise InvalidPayment(
                    reasons.INVALID_SIGNATURE, "signature is not from the payer"
                ) from None

    async def verify_payment(self, payment: Payment) -> Verified:
        """Every check short of sending: offline, EIP-1271, one ``eth_call`` simulation."""
        await self._chain_id_checked(payment.requirement.network)
        contract_wallet = await self._check_signature(payment, now=self._now())
        if self._remote is None:
            await self._chain.simulate_transfer(
                payment.authorization,
                payment.signature,
                self._sim_sender,
                contract_wallet=contract_wallet,
            )
        else:
            await self._verify_remote(self._remote, payment)
        return Verified(payment, contract_wallet)

    async def verify(
        self,
        header_value: str,
        offered: Sequence[Requirement],
        *,
        version_hint: Literal[1, 2] | None = None,
    ) -> Verified:
        return await self.verify_payment(
            self.decode(header_value, offered, version_hint=version_hint)
        )

    # -- pay -------------------------------------------------------------------------------------

    async def pay(
        self,
        header_value: str,
        offered: Sequence[Requirement],
        *,
        version_hint: Literal[1, 2] | None = None,
    ) -> Settled:
        """Verify and settle the payment in ``header_value`` against the requirements offered
        for THIS request. Raises InvalidPayment (402), InfrastructureError (503) or
        SettlementFailed."""
        payment = self.decode(header_value, offered, version_hint=version_hint)
        return await self.settle_payment(payment)

    async def settle_payment(self, payment: Payment) -> Settled:
        chain_id = await self._chain_id_checked(payment.requirement.network)
        key = _key(payment.authorization, chain_id, payment.requirement.asset)
        running = self._inflight.get(key)
        if running is not None:  # same authorization already settling here: share its outcome
            await self._replay_check(payment)
            return self._as_replay(await asyncio.shield(running), payment)
        try:
            verified = await self.verify_payment(payment)
        except InvalidPayment as exc:
            replay = await self._find_replay(payment, key, exc)
            if replay is None:
                raise
            return replay
        return await self._settle_once(verified, key)

    async def _settle_once(self, verified: Verified, key: _Key) -> Settled:
        running = self._inflight.get(key)
        if running is not None:
            return self._as_replay(await asyncio.shield(running), verified.payment)
        task = asyncio.create_task(
            self._reserve_and_settle(verified, key)
            if self._remote is None
            else self._settle_remote(verified, key)
        )
        self._inflight[key] = task
        task.add_done_callback(lambda t: self._task_done(key, t))
        return await asyncio.shield(task)

    def _task_done(self, key: _Key, task: asyncio.Task[Settled]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when nobody waited

    @staticmethod
    def _as_replay(result: Settled, payment: Payment) -> Settled:
        return dataclasses.replace(
            result,
            replay=True,
            version=payment.version,
            network=payment.requirement.network,
        )

    async def _find_replay(
        self, payment: Payment, key: _Key, exc: InvalidPayment
    ) -> Settled | None:
        """Is the failed check explained by an earlier use of this authorization HERE?"""
        if exc.reason not in _REPLAY_SIM_REASONS | _REPLAY_TIME_REASONS and not isinstance(
            exc, _RemoteInvalid
        ):
            return None
        running = self._inflight.get(key)
        row = None
        if running is None:
            row = await self._ledger.get_by_key(*key)
            if row is None:
                return None
        if exc.reason in _REPLAY_TIME_REASONS and not await self._signature_ok(payment):
            return None
        if running is not None:
            return self._as_replay(await asyncio.shield(running), payment)
        assert row is not None
        if self._remote is not None and row.state is PaymentState.RESERVED:
            # an earlier remote settlement of it ended without an answer: finish it now
            return await self._settle_once(Verified(payment, contract_wallet=False), key)
        return await self._outcome(row, payment)

    async def _reserve(self, payment: Payment, key: _Key) -> tuple[PaymentRecord, bool]:
        """Insert the payment under its unique key before anything is sent: ``created`` False
        means an earlier request holds this authorization (a replay)."""
        auth = payment.authorization
        req = payment.requirement
        return await self._ledger.reserve(
            NewPayment(
                chain_id=key[0],
                asset=req.asset,
                payer=auth.from_,
                nonce=auth.nonce,
                amount=auth.value,
                pay_to=auth.to,
                network=req.network.caip2,
                version=payment.version,
                valid_before=auth.valid_before,
            )
        )

    async def _reserve_and_settle(self, verified: Verified, key: _Key) -> Settled:
        payment = verified.payment
        auth = payment.authorization
        row, created = await self._reserve(payment, key)
        if not created:
            return await self._outcome(row, payment)
        payment_id = row.id
        self._checkpoint("after_reserve")

        async def record(tx_hash: str) -> None:
            await self._ledger.mark_submitted(payment_id, tx_hash)

        settler = self._settler
        assert settler is not None  # local mode (no remote facilitator) always has one
        try:
            tx_hash = await settler.submit(
                auth,
                payment.signature,
                contract_wallet=verified.contract_wallet,
                before_send=record,
            )
        except SendUncertain:
            log.warning("settlement send uncertain payment=%s payer=%s", payment_id, auth.from_)
            raise
        except (SendRejected, InfrastructureError, LedgerError) as exc:
            # provably not broadcast (refused, or failed before the send): the payer may retry
            await self._release_quietly(payment_id)
            if isinstance(exc, InfrastructureError):
                raise
            raise InfrastructureError(f"could not submit the settlement: {exc}") from exc
        self._checkpoint("after_send")
        log.info(
            "settlement submitted payment=%s payer=%s amount=%d tx=%s",
            payment_id,
            auth.from_,
            auth.value,
            tx_hash,
        )
        try:
            await settler.confirm(tx_hash, payer=auth.from_, pay_to=auth.to, amount=auth.value)
        except SettlementFailed as exc:
            row = await self._after_failed_tx(await self._ledger.get(payment_id), exc.reason)
            if row.state is not PaymentState.SETTLED:
                log.warning("settlement failed payment=%s reason=%s", payment_id, exc.reason)
                raise
        else:
            row = await self._ledger.mark_settled(payment_id)
        log.info("settled payment=%s tx=%s", payment_id, row.tx_hash)
        self._checkpoint("after_receipt_before_task")
        return self._settled(row, payment, replay=False)

    async def _release_quietly(self, payment_id: str) -> None:
        try:
            await self._ledger.release(payment_id)
        except (LedgerError, InfrastructureError) as exc:  # reconcile marks it failed later
            log.warning("could not release reservation payment=%s: %s", payment_id, exc)

    def _settled(self, row: PaymentRecord, payment: Payment, *, replay: bool) -> Settled:
        assert row.tx_hash is not None
        return Settled(
            payment_id=row.id,
            payer=row.payer,
            amount=row.amount,
            tx_hash=row.tx_hash,
            network=payment.requirement.network,
            version=payment.version,
            replay=replay,
            task_id=row.task_id,
            state=row.state,
        )

    async def _outcome(self, row: PaymentRecord, payment: Payment) -> Settled:
        """What a replay of ``row`` answers (no in-process settlement is running for it)."""
        auth = payment.authorization
        if row.amount != auth.value or normalize_address(row.pay_to) != auth.to:
            raise InvalidPayment(
                reasons.NONCE_ALREADY_USED, "this authorization nonce paid another payment"
            )
        if row.state is PaymentState.SUBMITTED:
            row = await self._resolve_submitted(row)
        if row.state in _SETTLED_STATES:
            return self._settled(row, payment, replay=True)
        if row.state is PaymentState.FAILED:
            reason = row.reason or reasons.UNEXPECTED_SETTLE_ERROR
            raise SettlementFailed(reason, "the first attempt with this authorization failed")
        raise InfrastructureError("this authorization is still being settled; retry shortly")

    # -- remote facilitator ----------------------------------------------------------------------

    async def _check_facilitator(self, remote: RemoteFacilitator) -> None:
        """Start-up hint only: a facilitator that is down now may be up for the first payment."""
        try:
            kinds = await remote.supported(retries=0, timeout_s=5.0)
        except InfrastructureError as exc:
            log.warning("facilitator %s not reachable at start-up: %s", remote.url, exc)
            return
        caip2 = f"eip155:{self._chain_id}"
        if not any(k.scheme == "exact" and k.network == caip2 for k in kinds):
            log.error(
                "facilitator %s does not list the exact scheme on %s: payments may be refused",
                remote.url,
                caip2,
            )

    async def _verify_remote(self, remote: RemoteFacilitator, payment: Payment) -> None:
        verdict = await remote.verify(payment)
        if not verdict.is_valid:
            raise _RemoteInvalid(
                verdict.reason or reasons.UNEXPECTED_VERIFY_ERROR,
                verdict.message or "the facilitator refused the payment",
            )
        if verdict.payer is not None and verdict.payer.lower() != payment.payer.lower():
            log.warning("facilitator /verify named payer %s for %s", verdict.payer, payment.payer)

    async def _settle_remote(self, verified: Verified, key: _Key) -> Settled:
        """Reserve, then the facilitator's /settle (see the module docstring)."""
        remote = self._remote
        assert remote is not None
        payment = verified.payment
        auth = payment.authorization
        row, created = await self._reserve(payment, key)
        if not created:
            if row.state is not PaymentState.RESERVED:
                return await self._outcome(row, payment)
            if row.amount != auth.value or normalize_address(row.pay_to) != auth.to:
                raise InvalidPayment(
                    reasons.NONCE_ALREADY_USED, "this authorization nonce paid another payment"
                )
            # An earlier /settle ended without an answer: did it move the money?
            used = await self._used_by(row)
            if used:
                settled = await self._settle_from_chain(row, used)
                if settled is not None:
                    log.info("settled from chain payment=%s tx=%s", row.id, used)
                    return self._settled(settled, payment, replay=True)
        self._checkpoint("after_reserve")
        outcome = await remote.settle(payment)
        if isinstance(outcome, Settlement):
            return await self._confirm_remote(row, payment, outcome.transaction, replay=not created)
        if isinstance(outcome, Refusal):
            earlier = not created or outcome.after_uncertain
            return await self._after_refusal(row, payment, outcome, earlier_uncertain=earlier)
        if created and not outcome.maybe_reached:
            await self._release_quietly(row.id)  # no attempt reached it: nothing can move
            raise FacilitatorUnavailable(f"facilitator unavailable: {outcome.detail}")
        log.warning(
            "remote settlement uncertain payment=%s payer=%s: %s",
            row.id,
            auth.from_,
            outcome.detail,
        )
        raise FacilitatorUnavailable(
            f"the facilitator's answer was lost ({outcome.detail}); retry with the same header"
        )

    async def _confirm_remote(
        self, row: PaymentRecord, payment: Payment, tx_hash: str, *, replay: bool
    ) -> Settled:
        """The facilitator says ``tx_hash`` settled it: record it, then believe the chain."""
        if _TX_HASH.fullmatch(tx_hash) is None:
            used = await self._used_by(row)
            settled = await self._settle_from_chain(row, used) if used else None
            if settled is None:
                raise InfrastructureError(f"the facilitator answered no usable tx ({tx_hash!r})")
            return self._settled(settled, payment, replay=replay)
        row = await self._ledger.mark_submitted(row.id, tx_hash)
        self._checkpoint("after_send")
        receipt = await self._chain.wait_receipt(tx_hash, self._receipt_timeout_s)
        try:
            self._chain.check_transfer(receipt, row.payer, row.pay_to, row.amount)
        except SettlementFailed as exc:
            row = await self._after_failed_tx(row, exc.reason)
            if row.state is not PaymentState.SETTLED:
                log.warning("remote settlement failed payment=%s reason=%s", row.id, exc.reason)
                raise
        else:
            row = await self._ledger.mark_settled(row.id)
        log.info(
            "settled by facilitator payment=%s payer=%s amount=%d tx=%s",
            row.id,
            row.payer,
            row.amount,
            row.tx_hash,
        )
        return self._settled(row, payment, replay=replay)

    async def _after_refusal(
        self,
        row: PaymentRecord,
        payment: Payment,
        refusal: Refusal,
        *,
        earlier_uncertain: bool,
    ) -> Settled:
        """A refusal is final only if the chain agrees nothing moved and nothing still can."""
        used = await self._used_by(row)
        if used:
            settled = await self._settle_from_chain(row, used)
            if settled is not None:
                log.info("settled from chain after a refusal payment=%s tx=%s", row.id, used)
                return self._settled(settled, payment, replay=earlier_uncertain)
        elif (
            used is None
            and (earlier_uncertain or refusal.reason in _MAYBE_SENT_REASONS)
            and row.valid_before > self._now()
        ):
            log.warning(
                "facilitator refused payment=%s (%s) but an attempt may still be mined",
                row.id,
                refusal.reason,
            )
            raise FacilitatorUnavailable(
                f"settlement not final yet ({refusal.reason}); retry with the same header"
            )
        await self._ledger.mark_failed(row.id, refusal.reason)
        log.info("facilitator refused payment=%s reason=%s", row.id, refusal.reason)
        raise SettlementFailed(refusal.reason, refusal.message)

    # -- resolving uncertain rows ----------------------------------------------------------------

    async def _used_by(self, row: PaymentRecord) -> str | None:
        """The tx that consumed the authorization on chain, if any (None: unused/canceled)."""
        if not await self._chain.authorization_state(row.payer, row.nonce):
            return None
        latest = await self._chain.block_number()
        tx = await self._chain.authorization_used_tx(
            row.payer, row.nonce, from_block=max(0, latest - self._lookback)
        )
        return tx or ""

    async def _settle_from_chain(self, row: PaymentRecord, tx_hash: str) -> PaymentRecord | None:
        receipt = await self._chain.get_receipt(tx_hash)
        if receipt is None:
            return None
        try:
            self._chain.check_transfer(receipt, row.payer, row.pay_to, row.amount)
        except SettlementFailed:
            return None
        return await self._ledger.mark_settled(row.id, tx_hash)

    async def _after_failed_tx(self, row: PaymentRecord, reason: str) -> PaymentRecord:
        """Our tx reverted or moved the wrong thing. If the authorization was nevertheless used
        (someone else submitted it first), the money moved: settled by THAT tx."""
        used = await self._used_by(row)
        if used:
            settled = await self._settle_from_chain(row, used)
            if settled is not None:
                return settled
        return await self._ledger.mark_failed(row.id, reason)

    async def _resolve_submitted(self, row: PaymentRecord) -> PaymentRecord:
        """Decide a ``submitted`` row from the chain; InfrastructureError if it cannot be yet."""
        assert row.tx_hash is not None
        receipt = await self._chain.get_receipt(row.tx_hash)
        if receipt is not None:
            try:
                self._chain.check_transfer(receipt, row.payer, row.pay_to, row.amount)
            except SettlementFailed as exc:
                return await self._after_failed_tx(row, exc.reason)
            return await self._ledger.mark_settled(row.id)
        if await self._chain.transaction_known(row.tx_hash):
            raise InfrastructureError(f"settlement {row.tx_hash} is still pending")
        used = await self._used_by(row)
        if used is not None:
            settled = await self._settle_from_chain(row, used) if used else None
            if settled is not None:
                return settled
            return await self._ledger.mark_failed(row.id, reasons.NONCE_ALREADY_USED)
        if row.valid_before <= self._now():
            # never mined, and the token will refuse it from now on: nothing can move any more
            return await self._ledger.mark_failed(row.id, reasons.VALID_BEFORE_EXPIRED)
        raise InfrastructureError(f"settlement {row.tx_hash} not found yet")

    async def reconcile(self, *, idle_for_ms: int | None = None) -> ReconcileReport:
        """Start-up pass over rows a crash may have left half-way (see module docstring).
        While serving, a sweep passes ``idle_for_ms``: only rows no request has touched for
        that long (an answer lost on the way, a payer that never retried, a failed refund)."""
        report = ReconcileReport()
        busy = set(self._inflight)
        for row in await self._ledger.pending(idle_for_ms=idle_for_ms):
            if (row.chain_id, row.asset, row.payer, row.nonce) in busy:
                continue
            try:
                await self._reconcile_row(row, report)
            except (PaymentError, LedgerError) as exc:
                log.warning("reconcile left payment=%s unresolved: %s", row.id, exc)
                report.unresolved.append(row.id)
        return report

    async def _reconcile_row(self, row: PaymentRecord, report: ReconcileReport) -> None:
        if row.state is PaymentState.RESERVED:
            # tx hashes are recorded before broadcasting, so no tx was sent for this row
            # unless the authorization shows up as used on chain anyway
            used = await self._used_by(row)
            settled = await self._settle_from_chain(row, used) if used else None
            if settled is not None:
                report.settled.append(row.id)
                report.needs_task.append(row.id)
            elif used is None and self._remote is not None:
                # A remote /settle may have reached the facilitator: it may still broadcast
                # the authorization until it expires, so the row is only ever failed after.
                if row.valid_before > self._now():
                    report.unresolved.append(row.id)
                else:
                    await self._ledger.mark_failed(row.id, reasons.VALID_BEFORE_EXPIRED)
                    report.failed.append(row.id)
            elif used is None:
                # Unused on chain and never broadcast: forget the reservation, so the payer's
                # retry of the same header settles normally instead of being refused.
                await self._ledger.release(row.id)
                report.released.append(row.id)
            else:
                await self._ledger.mark_failed(row.id, reasons.UNEXPECTED_SETTLE_ERROR)
                report.failed.append(row.id)
        elif row.state is PaymentState.SUBMITTED:
            row = await self._resolve_submitted(row)
            if row.state is PaymentState.SETTLED:
                report.settled.append(row.id)
                report.needs_task.append(row.id)
            else:
                report.failed.append(row.id)
        elif row.state is PaymentState.SETTLED:
            report.needs_task.append(row.id)
        elif row.state is PaymentState.REFUND_SUBMITTED:
            await self.refund(row.id)
            report.refunded.append(row.id)

    # -- after settlement ------------------------------------------------------------------------

    async def link_task(self, payment_id: str, task_id: str) -> PaymentRecord:
        return await self._ledger.link_task(payment_id, task_id)

    async def unlink_task(self, payment_id: str, task_id: str) -> PaymentRecord:
        """The work ``task_id`` was not delivered after all: the payment is owed back."""
        return await self._ledger.unlink_task(payment_id, task_id)

    async def refund(self, payment_id: str) -> PaymentRecord:
        """Send the payer's money back (settled -> refund_submitted -> refunded). Idempotent:
        a refunded payment returns as is; a refund in flight is awaited, not sent again."""
        async with self._refund_locks.hold(payment_id):
            return await self._refund_locked(payment_id)

    async def _refund_locked(self, payment_id: str) -> PaymentRecord:
        row = await self._ledger.get(payment_id)
        if row.state is PaymentState.REFUNDED:
            return row
        if self._settler is None:
            log.error(
                "refund owed payment=%s payer=%s amount=%d state=%s: no settler key to send it "
                "(remote facilitator mode); configure one and restart to pay it back",
                row.id,
                row.payer,
                row.amount,
                row.state.value,
            )
            raise InfrastructureError(
                "no settler key: refunds cannot be sent in remote facilitator mode without one"
            )
        if row.state is PaymentState.REFUND_SUBMITTED:
            assert row.refund_tx is not None
            receipt = await self._chain.get_receipt(row.refund_tx)
            if receipt is None:
                if not await self._chain.transaction_known(row.refund_tx):
                    raise InfrastructureError(f"refund {row.refund_tx} is not known to the node")
                return await self._confirm_refund(row, row.refund_tx)
            if receipt.succeeded:
                return await self._confirm_refund(row, row.refund_tx)
            return await self._send_refund(row, resend=True)  # reverted: nothing moved
        if row.state is not PaymentState.SETTLED:
            raise IllegalTransition(payment_id, row.state, "refund")
        return await self._send_refund(row, resend=False)

    async def _send_refund(self, row: PaymentRecord, *, resend: bool) -> PaymentRecord:
        settler = self._settler
        assert settler is not None  # checked by _refund_locked
        # a refund the settler cannot cover would only burn gas on a revert
        held = await self._chain.balance_of(settler.address)
        if held < row.amount:
            raise InfrastructureError(
                f"settler {settler.address} holds {held}, cannot refund {row.amount}"
            )
        calls = 0

        async def record(tx_hash: str) -> None:
            nonlocal calls
            await self._ledger.mark_refund_submitted(row.id, tx_hash, resend=resend or calls > 0)
            calls += 1

        try:
            tx_hash = await settler.refund(row.payer, row.amount, before_send=record)
        except SendUncertain:
            raise
        except (SendRejected, InfrastructureError):
            if calls:  # recorded but provably not broadcast
                try:
                    await self._ledger.abandon_refund(row.id)
                except (LedgerError, InfrastructureError) as exc:
                    log.warning("could not abandon refund payment=%s: %s", row.id, exc)
            raise
        self._checkpoint("mid_refund")
        log.info(
            "refund submitted payment=%s payer=%s amount=%d tx=%s",
            row.id,
            row.payer,
            row.amount,
            tx_hash,
        )
        return await self._confirm_refund(row, tx_hash)

    async def _confirm_refund(self, row: PaymentRecord, tx_hash: str) -> PaymentRecord:
        settler = self._settler
        assert settler is not None  # checked by _refund_locked
        receipt = await settler.wait(tx_hash)
        settler.check_transfer(receipt, settler.address, row.payer, row.amount)
        done = await self._ledger.mark_refunded(row.id)
        log.info("refunded payment=%s tx=%s", row.id, tx_hash)
        return done

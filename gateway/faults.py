"""Test-only fault injection: die by SIGKILL at a named step of the paid path.

Crash-safety tests start the gateway with ``X402_FAULT_INJECTION=true`` (allowed only in dev
mode, see `Settings`) and ``X402_FAULT_KILL_AT=<point>``; the process then kills itself the
first time the paid path reaches that point, exactly as a power cut would: no ``finally``, no
shutdown hooks, no flushed buffers except the log line written just before. The restarted
gateway (without the variable) must reconcile every payment to one outcome.

Points, in the order a paid request meets them:

    after_reserve              ledger row reserved, nothing sent
    after_send                 settlement tx broadcast, receipt not awaited
    after_receipt_before_task  payment settled on chain and in the ledger, no task yet
    mid_render                 task processing, render under way
    mid_refund                 refund tx broadcast, not confirmed

The payments and generation packages only see a ``Callable[[str], None]``; the wiring that
hands `checkpoint_for(settings)` to them lives in `gateway.services`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Final, Protocol

__all__ = [
    "CHECKPOINTS",
    "KILL_AT_ENV",
    "Checkpoint",
    "FaultConfigError",
    "checkpoint_for",
    "no_checkpoint",
]

log = logging.getLogger("x402.faults")

KILL_AT_ENV: Final = "X402_FAULT_KILL_AT"
CHECKPOINTS: Final = (
    "after_reserve",
    "after_send",
    "after_receipt_before_task",
    "mid_render",
    "mid_refund",
)

Checkpoint = Callable[[str], None]


class _FaultSettings(Protocol):
    @property
    def fault_injection(self) -> bool: ...


class FaultConfigError(ValueError):
    """``X402_FAULT_KILL_AT`` names no known point (a typo would silently test nothing)."""


def no_checkpoint(name: str) -> None:
    """The production hook: does nothing."""


def _kill_self() -> None:
    # Flush what was logged so the test can see where the process died, then die hard.
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_point(environ: Mapping[str, str]) -> str | None:
    point = environ.get(KILL_AT_ENV, "").strip()
    if not point:
        return None
    if point not in CHECKPOINTS:
        raise FaultConfigError(
            f"{KILL_AT_ENV}={point!r}: known points are {', '.join(CHECKPOINTS)}"
        )
    return point


def checkpoint_for(
    settings: _FaultSettings,
    environ: Mapping[str, str] | None = None,
    *,
    kill: Callable[[], None] = _kill_self,
) -> Checkpoint:
    """The hook for these settings: `no_checkpoint` unless fault injection is on (dev mode
    only). The kill point is read once, here, and a bad one fails the start."""
    if not settings.fault_injection:
        return no_checkpoint
    point = _kill_point(os.environ if environ is None else environ)
    if point is None:
        return no_checkpoint
    log.warning("fault injection armed: this process will SIGKILL itself at %s", point)

    def kill_at(name: str) -> None:
        if name == point:
            log.warning("fault injection: SIGKILL at %s", name)
            kill()

    return kill_at

"""The fault-injection switch itself: off unless settings allow it (dev mode only), a typo in
the kill point fails loudly, and the armed hook fires at its point and nowhere else."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydantic import ValidationError

from gateway.faults import (
    CHECKPOINTS,
    KILL_AT_ENV,
    FaultConfigError,
    checkpoint_for,
    no_checkpoint,
)
from gateway.settings import Settings


@dataclass(frozen=True)
class _Switch:
    fault_injection: bool


def test_production_settings_refuse_fault_injection() -> None:
    with pytest.raises(ValidationError, match="dev mode"):
        Settings(fault_injection=True, _env_file=None)  # type: ignore[call-arg]
    assert Settings(mode="dev", fault_injection=True, _env_file=None).fault_injection  # type: ignore[call-arg]


def test_off_means_the_no_op_hook_whatever_the_environment() -> None:
    env = {KILL_AT_ENV: "after_send"}
    assert checkpoint_for(_Switch(False), env) is no_checkpoint
    assert checkpoint_for(_Switch(True), {}) is no_checkpoint


def test_unknown_point_fails_the_start() -> None:
    with pytest.raises(FaultConfigError, match="after_sned"):
        checkpoint_for(_Switch(True), {KILL_AT_ENV: "after_sned"})


@pytest.mark.parametrize("point", CHECKPOINTS)
def test_armed_hook_fires_only_at_its_point(point: str) -> None:
    fired: list[str] = []
    hook = checkpoint_for(_Switch(True), {KILL_AT_ENV: point}, kill=lambda: fired.append(point))
    for name in CHECKPOINTS:
        hook(name)
    assert fired == [point]

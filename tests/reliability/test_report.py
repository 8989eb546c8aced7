"""The README section generator: figures in, markdown out, only between the markers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.reliability.report import END, START, ReportError, read_facts, render, rewrite

FACTS = [
    {"kind": "outcome", "test": "t.py::a", "outcome": "passed", "xfail": False, "seconds": 2.0},
    {"kind": "outcome", "test": "t.py::gap", "outcome": "skipped", "xfail": True, "seconds": 1},
    {"kind": "inputs", "suite": "decoder properties", "target": "x", "count": 400, "crashes": 0},
    {"kind": "inputs", "suite": "decoder properties", "target": "y", "count": 100, "crashes": 0},
    {"kind": "inputs", "suite": "ssrf urls", "target": "gateway", "count": 60, "leaks": 0},
    {
        "kind": "fault",
        "fault": "sqlite locked",
        "status": 503,
        "charged": False,
        "retry": "paid once",
        "integrity": "ok",
    },
    {
        "kind": "crash",
        "point": "after_send",
        "ledger_at_death": ["submitted"],
        "money_moved": True,
        "outcome": "refunded",
        "settled_times": 1,
        "retry_status": 409,
        "ledger_equals_chain": True,
    },
    {
        "kind": "load",
        "payers": 200,
        "requests": 920,
        "payments": 800,
        "replays": 120,
        "seconds": 9.5,
        "per_second": 96.4,
        "p50_ms": 1183,
        "p99_ms": 4413,
        "five_xx": 0,
        "double_charges": 0,
        "ledger_equals_chain": True,
    },
]


def test_render_carries_the_recorded_figures() -> None:
    text = render(FACTS, generated="2026-01-01")
    assert text.startswith("## Reliability")
    assert "1 tests passed" in text and "1 known gaps" in text
    assert "**Hostile input**: 500 inputs, 0 crashes" in text
    assert "| decoder properties | 500 |" in text
    assert "60 image/webhook URLs" in text
    assert "| sqlite locked | 503 + Retry-After | no | paid once; integrity_check ok |" in text
    assert "| after_send | submitted | yes | refunded | 1x | 409, no new charge | yes |" in text
    assert "200 concurrent payers, 920 requests" in text
    assert "`gap`" in text
    assert render(FACTS, generated="2026-01-01") == text  # deterministic


def test_a_failed_run_is_not_published() -> None:
    failed = [*FACTS, {"kind": "outcome", "test": "t.py::b", "outcome": "failed", "seconds": 1}]
    with pytest.raises(ReportError, match=r"t\.py::b"):
        render(failed, generated="x")


def test_rewrite_touches_only_the_section() -> None:
    readme = f"# Title\n\nintro\n\n{START}\nold\n{END}\n\n## After\n"
    out = rewrite(readme, "## Reliability\nnew\n")
    assert out == f"# Title\n\nintro\n\n{START}\n## Reliability\nnew\n{END}\n\n## After\n"
    assert rewrite(out, "## Reliability\nnew\n") == out
    with pytest.raises(ReportError):
        rewrite("# no markers\n", "x")


def test_read_facts(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(f) for f in FACTS) + "\n\n")
    assert read_facts(path) == FACTS
    path.write_text("{broken\n")
    with pytest.raises(ReportError, match=r"r\.jsonl:1"):
        read_facts(path)

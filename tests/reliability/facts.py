"""Figures the reliability tests record for the README's "Reliability" section.

Each test writes JSON lines of facts (what was injected, how many inputs were tried, how many
payers were held, what was compared with the chain) to the file named by
``X402_RELIABILITY_RESULTS``; `scripts/reliability-report` turns them into the section. Without
the variable nothing is written, so an ordinary test run leaves no files behind.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

RESULTS_ENV = "X402_RELIABILITY_RESULTS"


class Recorder:
    def __init__(self, path: Path | None, test: str) -> None:
        self.path = path
        self.test = test
        self.facts: list[dict[str, Any]] = []

    def record(self, kind: str, **fields: Any) -> None:
        fact = {"kind": kind, "test": self.test, "at": round(time.time(), 3), **fields}
        self.facts.append(fact)
        if self.path is not None:
            line = json.dumps(fact, sort_keys=True, separators=(",", ":")) + "\n"
            # one write per line on an O_APPEND file: whole lines even from parallel workers
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)


def results_path() -> Path | None:
    value = os.environ.get(RESULTS_ENV)
    return Path(value) if value else None

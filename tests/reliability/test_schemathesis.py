"""Schemathesis against the gateway's own /openapi.json, every route, on the real server.

Valid (positive) and schema-violating (negative) requests, bounded and derandomized. The only
5xx the document allows is the status of a failed task (500, with the refund); anything else
>= 500 is a bug, and every 4xx says why in JSON.

(Driven through schemathesis' operation strategies rather than `schema.parametrize()`: its
lazy-fixture path reads a pytest node attribute that pytest 9 no longer has.)
"""

from __future__ import annotations

import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.openapi import from_url

from tests.reliability.facts import Recorder
from tests.reliability.harness import start_inprocess

EXAMPLES = 60  # per operation and mode


def _check(case: Any, base_url: str) -> int:
    response = case.call(base_url=base_url, timeout=15)
    label = f"{case.method} {case.formatted_path}"
    if response.status_code == 500 and case.path == "/generation/{task_id}/status":
        assert response.json()["status"] == "failed"  # the documented 500
        return 500
    assert response.status_code < 500, (label, response.text[:300])
    if response.status_code >= 400:
        content_type = response.headers.get("content-type", [""])[0]
        assert content_type.startswith("application/json"), (label, content_type)
        assert response.json().get("error"), (label, response.text[:300])
    return int(response.status_code)


def _fuzz(operation: Any, mode: GenerationMode, base_url: str) -> tuple[int, set[int]]:
    statuses: list[int] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        statuses.append(_check(case, base_url))

    try:
        run()
    except Unsatisfiable:
        # nothing to break (no parameters, no body): no negative case exists
        assert mode is GenerationMode.NEGATIVE and not statuses, operation.label
    return len(statuses), set(statuses)


def test_every_route_answers_4xx_or_success_never_5xx(
    local_chain: Any, tmp_path: Any, facts: Recorder
) -> None:
    gw = start_inprocess(local_chain, tmp_path, challenge_rate_per_ip=0, refusal_rate_per_payer=0)
    started = time.monotonic()
    try:
        schema = from_url(f"{gw.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 4, operations
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                calls, statuses = _fuzz(operation, mode, gw.url)
                if calls:
                    facts.record(
                        "inputs",
                        suite="schemathesis",
                        target=f"{operation.method.upper()} {operation.path} ({mode.value})",
                        count=calls,
                        statuses=sorted(statuses),
                        crashes=0,
                    )
    finally:
        gw.stop()
    assert time.monotonic() - started < 60

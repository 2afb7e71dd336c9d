"""Fuzzing the routes with schemathesis against the stand-in ComfyUI: no 500, and every answer
(status, content type, headers, body) as the OpenAPI document says.

schemathesis generates requests from the document, valid ones and invalid ones, and sends
them over real HTTP to a harness of conftest.py (whose own middleware also checks every
answer). The budget is small for CI and deterministic (`derandomize`); set
COURIER_FUZZ_EXAMPLES (examples per operation and mode, default 100) and
COURIER_FUZZ_RANDOM=1 for a longer, randomised run.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from comfy_courier.openapi import document

from conftest import API_KEY

# "no 500" is schemathesis' not_a_server_error; the others: the answer matches the document
CHECKS = [schemathesis.checks.not_a_server_error, status_code_conformance,
          content_type_conformance, response_headers_conformance, response_schema_conformance]
EXAMPLES = int(os.environ.get("COURIER_FUZZ_EXAMPLES", "100"))
# HTTP's own framing: a generated value (content-length: 1WO)e) is refused by aiohttp's
# parser with a bare 400 before any route runs, which no route or document can change
FRAMING = {"content-length", "transfer-encoding"}
RANDOM = os.environ.get("COURIER_FUZZ_RANDOM") == "1"


def fuzz(base_url: str) -> tuple[list[str], int]:
    """Runs every operation in both modes; returns the failures and how many requests went."""
    schema = schemathesis.openapi.from_dict(document())
    failures: list[str] = []
    sent = 0
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            # the document's examples first: a job that runs (202, then the 200 replay), whose
            # id the GET and DELETE examples then find
            examples = schema.get_strategies_from_examples(operation)
            for mode, strategy in (
                    ("examples", st.one_of(examples) if examples else None),
                    (schemathesis.GenerationMode.POSITIVE, operation.as_strategy()),
                    (schemathesis.GenerationMode.NEGATIVE, operation.as_strategy(
                        generation_mode=schemathesis.GenerationMode.NEGATIVE))):
                if strategy is None:
                    continue

                @given(case=strategy)
                @settings(max_examples=EXAMPLES, deadline=None, database=None,
                          derandomize=not RANDOM, suppress_health_check=list(HealthCheck),
                          phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink],
                          print_blob=True)
                def run(case: Any) -> None:
                    nonlocal sent
                    sent += 1
                    if case.headers:
                        case.headers = {k: v for k, v in case.headers.items()
                                        if k.lower() not in FRAMING}
                    case.call_and_validate(base_url=base_url, session=session,
                                           headers={"X-API-Key": API_KEY}, checks=CHECKS,
                                           timeout=10)

                try:
                    run()
                except Unsatisfiable:
                    # no invalid request exists for an operation without inputs (health, ...)
                    if mode is not schemathesis.GenerationMode.NEGATIVE:
                        raise
                except Exception as e:  # one operation's failure must not hide another's
                    failures.append(f"{operation.label} ({mode}): {e}")
    return failures, sent


async def test_schemathesis_finds_no_500_and_no_answer_off_the_document(make_harness):
    h = await make_harness(env={"COURIER_METRICS_KEY": "metrics-key-abcdef",
                                "COURIER_MAX_QUEUE": "5"})
    base_url = str(h.client.make_url("")).rstrip("/")
    failures, sent = await asyncio.to_thread(fuzz, base_url)
    assert failures == [], "\n\n".join(failures)
    operations = sum(1 for _ in schemathesis.openapi.from_dict(document()).get_all_operations())
    assert sent >= operations * 2  # every operation was run in both modes
    assert h.conformance.violations == []

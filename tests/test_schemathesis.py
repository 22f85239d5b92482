"""Schemathesis against the gateway's own OpenAPI document, on a real ``lora-gateway serve``:
generated requests for every operation, valid ones and invalid ones (a bounded number each,
derandomized: the same examples every run), and for each answer: no server error, a status the
operation documents, its documented media type, and a body that matches its schema."""

from __future__ import annotations

from typing import Iterator

import pytest
import yaml

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_schema_conformance, status_code_conformance,
)
from tests.crash_harness import GatewayProcess, _free_port, wait_until_ready  # noqa: E402

EXAMPLES = 12


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "data_dir": str(tmp / "data"), "logging": {"level": "warning"},
        "teams": {"rate_limit_per_minute": 0},
        "providers": {"sandbox": {"training_seconds": 1, "queue_seconds": 0.1}},
    }))
    gw = GatewayProcess(cfg, _free_port(), tmp)
    gw.start()
    try:
        wait_until_ready([gw])
        key = gw.first_key()
        assert key, "the gateway printed no key"
        yield gw.base, key
    finally:
        gw.stop()


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_every_answer_matches_the_document(gateway: tuple[str, str]) -> None:
    base, key = gateway
    schema = schemathesis.openapi.from_url(f"{base}/schema/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15

    for operation, mode in [(op, m) for op in operations for m in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            case.headers = {**(case.headers or {}), "X-API-Key": key}
            case.call_and_validate(checks=CHECKS)

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid: an operation without parameters or body
            assert mode == GenerationMode.NEGATIVE and not operation.query and not operation.body
        except Exception as e:  # noqa: BLE001 - every operation is tried; all failures are reported
            failures.append(f"{operation.method.upper()} {operation.path} ({mode}): {str(e)[:1500]}")
    assert not failures, "\n\n".join(failures)

"""Crash recovery, proven by killing a real process (see tests/crash_harness.py)."""

from __future__ import annotations

from pathlib import Path

from tests.crash_harness import HarnessConfig, run


async def test_sigkill_at_random_points_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    report = await run(HarnessConfig(workdir=tmp_path, loras=5, jobs_per_lora=2, kills=5, seed=7))
    assert report.kills == 5
    assert report.loras == 5 and report.jobs == 10
    assert report.anomalies == [], "\n".join(report.anomalies)
    assert report.resubmissions == 0

"""What the gateway keeps, and for how long: a sweep that every engine runs once per
``files.sweep_interval_s`` (and ``lora-gateway gc`` runs by hand).

- **Generated images** are deleted ``files.retention_days`` after their job completed; the job
  then says ``expired: true`` (its row, input and cost stay). The files go first and the row is
  marked after, so a sweep cut short deletes again next time and never marks a job whose files
  are still there.
- **Work directories** (``data_dir/work``): a LoRA's dataset directory is removed when it ends,
  and this sweep removes any left behind (a process killed in between) once its LoRA is in a
  terminal state or gone; temporary directories of steps that were killed are removed once
  they are older than ``STALE_TMP_S``.

Every process may sweep at once: each step is idempotent.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from gateway.store import jobs as jobs_store
from gateway.store import loras as loras_store

log = structlog.get_logger()

#: a temp directory under ``work/`` untouched for this long belongs to no running step
STALE_TMP_S = 6 * 3600
DAY_S = 86_400


@dataclass
class SweepReport:
    jobs_expired: int = 0
    files_deleted: int = 0
    work_dirs_removed: int = 0

    def __str__(self) -> str:
        return (f"{self.jobs_expired} jobs expired ({self.files_deleted} files deleted), "
                f"{self.work_dirs_removed} work directories removed")


async def sweep(gw: Any, *, at: float | None = None) -> SweepReport:
    """One pass; ``at`` is the time to judge ages by (now by default)."""
    t = time.time() if at is None else at
    report = SweepReport()
    days = gw.settings.files.retention_days
    if days > 0:
        while True:
            async with gw.db.read() as conn:
                due = await jobs_store.due_for_expiry(conn, completed_before=t - days * DAY_S)
            if not due:
                break
            for job_id in due:
                report.files_deleted += await gw.storage.delete_prefix(f"jobs/{job_id}/")
            async with gw.db.tx() as conn:
                await jobs_store.mark_expired(conn, due, t)
            report.jobs_expired += len(due)
    report.work_dirs_removed = await _sweep_work(gw, t)
    if report.jobs_expired or report.work_dirs_removed:
        log.info("retention_sweep", jobs_expired=report.jobs_expired, files_deleted=report.files_deleted,
                 work_dirs_removed=report.work_dirs_removed)
    return report


async def _sweep_work(gw: Any, t: float) -> int:
    work: Path = gw.work_dir
    removed = 0
    loras_dir = work / "loras"
    if loras_dir.is_dir():
        names = [p.name for p in loras_dir.iterdir() if p.is_dir()]
        async with gw.db.read() as conn:
            ended = await loras_store.ended_ids(conn, names)
        for name in ended:
            await anyio.to_thread.run_sync(lambda n=name: shutil.rmtree(loras_dir / n, ignore_errors=True))
            removed += 1
    if work.is_dir():
        for p in work.iterdir():
            if p.is_dir() and p.name.startswith("tmp") and t - _newest_mtime(p) > STALE_TMP_S:
                await anyio.to_thread.run_sync(lambda q=p: shutil.rmtree(q, ignore_errors=True))
                removed += 1
    return removed


def _newest_mtime(path: Path) -> float:
    newest = path.stat().st_mtime
    for p in path.rglob("*"):
        try:
            newest = max(newest, p.stat().st_mtime)
        except OSError:
            pass
    return newest

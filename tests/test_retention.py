"""Retention: generated images go after ``files.retention_days`` (the job then says expired),
work directories left behind go once their row has ended; ``lora-gateway gc`` runs the sweep."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from gateway import retention
from gateway.cli import main
from tests.conftest import Api

DAY = 86_400


async def completed_job(api: Api, lora_id: str) -> dict[str, Any]:
    r = await api.client.post("/v2/images/generate", headers=api.h(), json={
        "prompt": "a portrait", "model": "flux-lora", "fluxLoraParams": {"loraId": lora_id, "num_outputs": 2}})
    assert r.status_code == 202, r.text
    job = await api.wait_job(r.json()["jobId"])
    assert job["status"] == "COMPLETED" and job["expired"] is False
    return job


def path_of(url: str) -> str:
    return "/" + url.split("://", 1)[1].split("/", 1)[1]


async def test_images_are_deleted_after_the_retention_and_the_job_says_expired(api: Api) -> None:
    lora = await api.ready_lora()
    old, recent = await completed_job(api, lora["id"]), await completed_job(api, lora["id"])
    async with api.gw.db.read() as conn:
        from gateway.store import jobs as jobs_store

        old_done = (await jobs_store.get_job(conn, old["id"])).completed_at
        recent_done = (await jobs_store.get_job(conn, recent["id"])).completed_at
    days = api.gw.settings.files.retention_days
    assert days == 30
    # judged from a moment when only the first job is older than the retention
    at = old_done + days * DAY + (recent_done - old_done) / 2
    report = await retention.sweep(api.gw, at=at)
    assert report.jobs_expired == 1 and report.files_deleted == 2
    got = (await api.client.get(f"/v2/jobs/{old['id']}", headers=api.h())).json()
    assert got["expired"] is True and got["status"] == "COMPLETED" and got["creditCost"] == old["creditCost"]
    for url in got["result"]["images"]:
        r = await api.client.get(path_of(url))
        assert r.status_code == 404 and "deleted" in r.json()["error"]
    still = (await api.client.get(f"/v2/jobs/{recent['id']}", headers=api.h())).json()
    assert still["expired"] is False
    assert [(await api.client.get(path_of(u))).status_code for u in still["result"]["images"]] == [200, 200]
    # again: nothing left to do
    assert (await retention.sweep(api.gw, at=at)).jobs_expired == 0


async def test_zero_days_keeps_images_forever(make_api: Any) -> None:
    async with make_api(files={"retention_days": 0}) as api:
        lora = await api.ready_lora()
        job = await completed_job(api, lora["id"])
        assert (await retention.sweep(api.gw, at=time.time() + 10_000 * DAY)).jobs_expired == 0
        assert (await api.client.get(f"/v2/jobs/{job['id']}", headers=api.h())).json()["expired"] is False


async def test_work_directories_left_behind_are_removed_once_their_row_ended(make_api: Any) -> None:
    async with make_api(providers={"sandbox": {"training_seconds": 600, "queue_seconds": 0}}) as api:
        training = (await api.create_lora(15)).json()["id"]
        work = api.gw.work_dir
        (work / "loras" / training).mkdir(parents=True, exist_ok=True)  # in use
        archived = (await api.create_lora(15)).json()["id"]
        assert (await api.client.delete(f"/v2/loras/{archived}", headers=api.h())).status_code == 204
        (work / "loras" / archived).mkdir(parents=True, exist_ok=True)  # left behind by a killed process
        gone = work / "loras" / "00000000-0000-4000-8000-00000000dead"  # its row is not there at all
        gone.mkdir(parents=True)
        (gone / "dataset.zip").write_bytes(b"x" * 10)
        stale, fresh = work / "tmpstale", work / "tmpfresh"
        for d in (stale, fresh):
            d.mkdir()
            (d / "f").write_bytes(b"x")
        old = time.time() - retention.STALE_TMP_S - 60
        os.utime(stale / "f", (old, old))
        os.utime(stale, (old, old))
        report = await retention.sweep(api.gw)
        assert report.work_dirs_removed == 3
        assert not gone.exists() and not stale.exists() and not (work / "loras" / archived).exists()
        assert (work / "loras" / training).exists() and fresh.exists()


def test_gc_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = ["--data-dir", str(tmp_path)]
    assert main(["gc", *d]) == 2  # no database here: it makes none
    assert "no database at" in capsys.readouterr().err
    assert main(["migrate", *d]) == 0
    (tmp_path / "work" / "loras" / "00000000-0000-4000-8000-00000000dead").mkdir(parents=True)
    capsys.readouterr()
    assert main(["gc", *d]) == 0
    out = capsys.readouterr().out
    assert "0 jobs expired" in out and "1 work directories removed" in out and "retention_days: 30" in out
    assert not (tmp_path / "work" / "loras" / "00000000-0000-4000-8000-00000000dead").exists()

"""The local provider end to end with the real worker subprocess on a tiny FLUX (CPU)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from providers.base import Dataset, TrainingSpec  # noqa: E402
from providers.local import trainer  # noqa: E402
from providers.local.provider import train_config  # noqa: E402
from tests.tiny_flux import make_local_provider, tiny_flux, write_dataset  # noqa: E402,F401
FIXTURES = (tiny_flux,)  # pytest fixtures, imported to be found (and seen as used)

STEPS, EVERY = 24, 4


async def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_a_training_killed_with_the_gateway_resumes_from_its_checkpoint(tiny_flux: Path, tmp_path: Path) -> None:
    """SIGKILL the worker mid-training while the gateway "crashes" too; a new provider object over
    the same data dir restarts the worker, which continues from the newest checkpoint (not from
    step 0) and ends with weights bit-identical to an uninterrupted run's."""
    data_dir = tmp_path / "data"
    cfg = dict(max_steps=STEPS, checkpoint_every=EVERY)
    p1 = make_local_provider(data_dir, tiny_flux, **cfg)
    await p1.start()
    spec = TrainingSpec(attempt_id="att-1", lora_id="lora-1", name="me", subject_kind="person", steps=1000,
                        lora_rank=8, trigger_word="K7XQZ", team_id="team-a")
    source = write_dataset(tmp_path / "ds", n=3)
    ref = (await p1.start_training(spec, Dataset(zip_path=tmp_path / "x.zip", directory=source, image_count=3))).ref
    job_dir = p1.runner.job_dir(ref)
    ckpts = job_dir / "output" / "checkpoints"

    async def checkpointed() -> bool:
        return ckpts.is_dir() and any(p.name.startswith("checkpoint-") for p in ckpts.iterdir())

    await wait_for(checkpointed, 120, "the first checkpoint")
    status = await p1.training_status(ref)
    assert status.state == "running"
    pid = p1.runner.load(ref).pid
    p1.runner.tick = lambda: None  # the gateway's scheduler is gone ...
    os.kill(pid, signal.SIGKILL)  # ... and the training process dies with no chance to save
    p1.runner.slots["cpu"].proc.wait(timeout=10)
    p1.runner.slots["cpu"] = None
    p1.runner.release_ownership()  # the dead gateway's lock goes with it
    assert p1.runner.load(ref).state == "running"  # nobody recorded the death

    p2 = make_local_provider(data_dir, tiny_flux, **cfg)
    await p2.start()
    assert p2.recovered == [ref]

    async def finished() -> Any:
        st = await p2.training_status(ref)
        return st if st.state in ("succeeded", "failed") else None

    st = await wait_for(finished, 180, "the resumed training")
    assert st.state == "succeeded", (st, (job_dir / "worker.log").read_text()[-3000:])
    result = json.loads((job_dir / "result.json").read_text())
    assert result["steps"] == STEPS and result["resumed_from"] > 0 and result["resumed_from"] % EVERY == 0
    assert p2.runner.load(ref).launches == 2
    fetched = tmp_path / "fetched.safetensors"
    await p2.fetch_file(st.artifact_url, fetched, max_bytes=50_000_000)

    reference = trainer.train(tiny_flux, source, train_config(p2.config, spec), tmp_path / "reference")
    assert reference.resumed_from == 0
    a, b = load_file(str(reference.weights)), load_file(str(fetched))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    await p1.aclose()
    await p2.aclose()

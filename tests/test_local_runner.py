"""The local provider's job handling with a stand-in worker (no torch needed): the fair queue,
one training per device, progress, cancel, crashes, restarts, artifacts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from providers.base import Dataset, ProviderError, ProviderRejected, ProviderUnavailable, TrainingSpec
from providers.local.queue import FairQueue
from tests.tiny_flux import make_local_provider, write_dataset

# Stands in for the interpreter: invoked as ``FAKE -m providers.local.worker JOB_DIR --device D
# --parent-pid N``. Behaviour by trigger word: CRASH exits 3 silently, FAILD reports a
# non-retryable failure, SLOWW trains until signalled (only on its first launch), else it
# "trains" ``steps`` steps of 40 ms. Every start/end goes to $FAKE_EVENTS.
FAKE_WORKER = textwrap.dedent('''\
    #!{python}
    import json, os, signal, sys, time
    job_dir = sys.argv[3]
    device = sys.argv[sys.argv.index("--device") + 1]
    job = json.load(open(os.path.join(job_dir, "job.json")))
    train = json.load(open(os.path.join(job_dir, "train.json")))
    def event(kind, **kw):
        with open(os.environ["FAKE_EVENTS"], "a") as f:
            f.write(json.dumps(dict(kind=kind, ref=job["ref"], device=device, t=time.time(),
                                    cuda=os.environ.get("CUDA_VISIBLE_DEVICES"), offline=os.environ.get("HF_HUB_OFFLINE"),
                                    launch=job["launches"], **kw)) + "\\n")
    def put(name, data):
        tmp = os.path.join(job_dir, "." + name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, os.path.join(job_dir, name))
    def on_term(*a):
        event("term")
        sys.exit(75)
    signal.signal(signal.SIGTERM, on_term)
    event("start", dataset=sorted(os.listdir(train["dataset_dir"])), steps=train["config"]["steps"])
    word = job["trigger_word"]
    total = train["config"]["steps"]
    if word == "CRASH":
        sys.exit(3)
    if word == "FAILD":
        put("result.json", dict(state="failed", error="dataset rejected: nope", retryable=False))
        sys.exit(1)
    if word == "SLOWW" and job["launches"] == 1:
        for i in range(600):
            put("progress.json", dict(phase="training", step=min(i, total - 1), total=total))
            time.sleep(0.05)
        sys.exit(9)
    for i in range(total):
        put("progress.json", dict(phase="training", step=i + 1, total=total))
        time.sleep(0.04)
    os.makedirs(os.path.join(job_dir, "output"), exist_ok=True)
    with open(os.path.join(job_dir, "output", "pytorch_lora_weights.safetensors"), "wb") as f:
        f.write(b"weights-of-" + job["ref"].encode())
    put("result.json", dict(state="succeeded", weights="output/pytorch_lora_weights.safetensors", steps=total))
    event("end")
''')


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    script = tmp_path / "fake-python"
    script.write_text(FAKE_WORKER.format(python=sys.executable))
    script.chmod(0o755)
    events = tmp_path / "events.jsonl"
    events.touch()
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    monkeypatch.setenv("FAKE_EVENTS", str(events))
    return {"python": str(script), "events": events, "model": model, "data": tmp_path / "data"}


async def provider(fake: dict[str, Any], *, start: bool = True, **cfg: Any) -> Any:
    """A LocalProvider as the gateway builds it; ``start``: as an engine process starts it."""
    p = make_local_provider(fake["data"], fake["model"], **{"python": fake["python"], "max_steps": 5, **cfg})
    if start:
        await p.start()
    return p


def events(fake: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in fake["events"].read_text().splitlines() if line.strip()]


def tspec(attempt: str, team: str | None = "team-a", word: str = "K7XQZ", steps: int = 1000) -> TrainingSpec:
    return TrainingSpec(attempt_id=attempt, lora_id=f"lora-{attempt}", name="me", subject_kind="person",
                        steps=steps, lora_rank=16, trigger_word=word, team_id=team)


def dataset(root: Path, n: int = 2) -> Dataset:
    d = write_dataset(root / f"ds-{time.time_ns()}", n=n)
    return Dataset(zip_path=root / "ds.zip", directory=d, image_count=n)


async def wait_state(p: Any, ref: str, states: tuple[str, ...], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        st = await p.training_status(ref)
        if st.state in states:
            return st
        assert time.monotonic() < deadline, f"{ref} stuck in {st}"
        await asyncio.sleep(0.05)


async def wait_started(fake: dict[str, Any], ref: str, timeout: float = 30) -> None:
    """Until the stand-in worker runs (its signal handler is installed)."""
    deadline = time.monotonic() + timeout
    while not any(e["kind"] == "start" and e["ref"] == ref for e in events(fake)):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- the queue itself


def test_fair_queue_round_robins_teams_and_keeps_order_within_a_team() -> None:
    q = FairQueue()
    for i, (ref, team) in enumerate([("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B"), ("c1", "C"), ("b2", "B")]):
        q.push(ref, team, i)
    assert q.order() == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert q.pop() == "a1"
    q.push("a4", "A", 10)
    assert q.order() == ["b1", "c1", "a2", "b2", "a3", "a4"]  # A was just served: B and C go first
    assert q.remove("c1") and not q.remove("c1")
    assert [q.pop() for _ in range(len(q))] == ["b1", "a2", "b2", "a3", "a4"]
    assert q.pop() is None


def test_fair_queue_newcomer_team_goes_before_a_busy_team() -> None:
    q = FairQueue()
    q.push("a1", "A", 1)
    assert q.pop() == "a1"
    q.push("a2", "A", 2)
    q.push("b1", None, 3)  # no team: a team of its own
    assert q.order() == ["b1", "a2"]


# --------------------------------------------------------------------------- scheduling


async def test_one_training_per_device_round_robin_across_teams(fake: dict[str, Any], tmp_path: Path) -> None:
    p = await provider(fake)
    refs = {}
    for attempt, team in [("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B")]:
        refs[attempt] = (await p.start_training(tspec(attempt, team), dataset(tmp_path))).ref
    for ref in refs.values():
        st = await wait_state(p, ref, ("succeeded", "failed"))
        assert st.state == "succeeded", st
    order = {v: k for k, v in refs.items()}
    assert [order[r] for r in p.runner.launched] == ["a1", "b1", "a2", "a3"]
    ev = events(fake)
    spans = sorted((e["t"], e["kind"]) for e in ev if e["kind"] in ("start", "end"))
    assert [k for _, k in spans] == ["start", "end"] * 4  # never two at once on the one device
    assert all(e["offline"] == "1" for e in ev)
    assert all(e["steps"] == 5 for e in ev if e["kind"] == "start")  # capped by max_steps (asked 1000)
    await p.aclose()


async def test_each_device_runs_its_own_training(fake: dict[str, Any], tmp_path: Path) -> None:
    p = await provider(fake, devices=["cuda:0", "cuda:1"])
    refs = [(await p.start_training(tspec(f"x{i}", f"T{i}"), dataset(tmp_path))).ref for i in range(4)]
    for ref in refs:
        assert (await wait_state(p, ref, ("succeeded", "failed"))).state == "succeeded"
    ev = [e for e in events(fake) if e["kind"] == "start"]
    assert {e["cuda"] for e in ev} == {"0", "1"} and {e["device"] for e in ev} == {"cuda"}
    running, peak = 0, 0
    for _, kind in sorted((e["t"], e["kind"]) for e in events(fake) if e["kind"] in ("start", "end")):
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak <= 2
    await p.aclose()


async def test_progress_is_reported_and_the_artifact_fetched(fake: dict[str, Any], tmp_path: Path) -> None:
    p = await provider(fake, max_steps=40)
    ref = (await p.start_training(tspec("p1"), dataset(tmp_path))).ref
    seen = []
    while (st := await p.training_status(ref)).state != "succeeded":
        assert st.state in ("queued", "running")
        seen.append(st.progress)
        await asyncio.sleep(0.05)
    assert any(0 < x < 1 for x in seen) and seen == sorted(seen)
    assert st.progress == 1.0 and st.artifact_url == f"local://trainings/{ref}/pytorch_lora_weights.safetensors"
    await p.fetch_file(st.artifact_url, tmp_path / "got" / "w.safetensors", max_bytes=1000)
    assert (tmp_path / "got" / "w.safetensors").read_bytes() == f"weights-of-{ref}".encode()
    with pytest.raises(ProviderError, match="limit"):
        await p.fetch_file(st.artifact_url, tmp_path / "w2", max_bytes=5)
    for url in ("local://trainings/../../etc/passwd", "file:///etc/passwd", "sandbox://artifacts/x.safetensors"):
        with pytest.raises(ProviderRejected):
            await p.fetch_file(url, tmp_path / "w3", max_bytes=1000)
    assert not (p.runner.job_dir(ref) / "dataset").exists()  # no longer needed once trained
    await p.aclose()


async def test_start_is_idempotent_copies_the_dataset_and_supports_lookup(fake: dict[str, Any], tmp_path: Path) -> None:
    p = await provider(fake)
    ds = dataset(tmp_path, n=3)
    sub = await p.start_training(tspec("same"), ds)
    for f in Path(ds.directory).iterdir():  # the gateway deletes its work dir after submitting
        f.unlink()
    assert (await p.start_training(tspec("same"), ds)).ref == sub.ref
    assert (await p.lookup_training("same")).ref == sub.ref
    assert await p.lookup_training("never-sent") is None
    both = await asyncio.gather(*(p.start_training(tspec("twice"), dataset(tmp_path)) for _ in range(2)))
    assert both[0].ref == both[1].ref
    await wait_state(p, sub.ref, ("succeeded",))
    await wait_state(p, both[0].ref, ("succeeded",))
    starts = [e for e in events(fake) if e["kind"] == "start" and e["ref"] == sub.ref]
    assert len([e for e in events(fake) if e["kind"] == "start" and e["ref"] == both[0].ref]) == 1
    assert len(starts) == 1 and starts[0]["dataset"] == ["001.jpg", "001.txt", "002.jpg", "002.txt", "003.jpg", "003.txt"]
    assert p.capabilities.can_lookup and p.capabilities.can_cancel
    assert p.capabilities.training.dataset_input == "directory"
    await p.aclose()


async def test_bad_submissions_are_rejected(fake: dict[str, Any], tmp_path: Path) -> None:
    p = await provider(fake)
    ds = dataset(tmp_path, n=2)
    with pytest.raises(ProviderRejected, match="expected 3"):
        await p.start_training(tspec("n"), Dataset(zip_path=ds.zip_path, directory=ds.directory, image_count=3))
    (Path(ds.directory) / "002.txt").unlink()
    with pytest.raises(ProviderRejected, match="caption"):
        await p.start_training(tspec("c"), ds)
    assert await p.lookup_training("n") is None and await p.lookup_training("c") is None
    missing = make_local_provider(fake["data"], tmp_path / "no-model", python=fake["python"])
    with pytest.raises(ProviderUnavailable) as info:
        await missing.start_training(tspec("m"), dataset(tmp_path))
    assert info.value.retryable  # another provider can take it
    with pytest.raises(ProviderRejected):
        await p.training_status("loc-t-" + "0" * 24)
    with pytest.raises(ProviderRejected):
        await p.training_status("../../etc")
    await p.aclose()


async def test_failures_map_to_retryable_or_not(fake: dict[str, Any], tmp_path: Path) -> None:
    p = await provider(fake)
    crash = (await p.start_training(tspec("c", word="CRASH"), dataset(tmp_path))).ref
    bad = (await p.start_training(tspec("f", word="FAILD"), dataset(tmp_path))).ref
    st = await wait_state(p, crash, ("failed",))
    assert st.retryable and "died (exit status 3)" in st.error
    st = await wait_state(p, bad, ("failed",))
    assert not st.retryable and st.error == "local: dataset rejected: nope"
    await p.aclose()


async def test_cancel_kills_a_running_training_and_drops_a_queued_one(fake: dict[str, Any], tmp_path: Path) -> None:
    p = await provider(fake)
    slow = (await p.start_training(tspec("s", word="SLOWW"), dataset(tmp_path))).ref
    queued = (await p.start_training(tspec("q", team="B"), dataset(tmp_path))).ref
    await wait_state(p, slow, ("running",))
    pid = p.runner.load(slow).pid
    assert (await p.training_status(queued)).state == "queued"
    await p.cancel_training(queued)
    await p.cancel_training(slow)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone (and reaped)
    for ref in (slow, queued):
        st = await p.training_status(ref)
        assert st.state == "failed" and st.error == "cancelled" and not st.retryable
    await asyncio.sleep(0.5)
    assert p.runner.launched == [slow]  # the cancelled queued job never started
    await p.cancel_training(slow)  # cancelling twice is harmless
    await p.aclose()


async def test_shutdown_checkpoints_and_a_restarted_provider_resumes(fake: dict[str, Any], tmp_path: Path) -> None:
    p1 = await provider(fake)
    slow = (await p1.start_training(tspec("s", word="SLOWW"), dataset(tmp_path))).ref
    later = (await p1.start_training(tspec("l", team="B"), dataset(tmp_path))).ref
    await wait_started(fake, slow)
    await p1.aclose()  # SIGTERM -> the worker checkpoints and exits 75 -> the job stays queued
    assert [e["kind"] for e in events(fake) if e["ref"] == slow] == ["start", "term"]
    assert p1.runner.load(slow).state == "queued" and p1.runner.load(later).state == "queued"

    p2 = await provider(fake)  # the gateway starts again over the same data dir
    assert p2.recovered == [slow, later]  # in submission order
    for ref in (slow, later):
        assert (await wait_state(p2, ref, ("succeeded", "failed"))).state == "succeeded"
    assert p2.runner.load(slow).launches == 2
    await p2.aclose()


async def test_a_worker_orphaned_by_a_crashed_gateway_is_replaced(fake: dict[str, Any], tmp_path: Path) -> None:
    p1 = await provider(fake)
    slow = (await p1.start_training(tspec("s", word="SLOWW"), dataset(tmp_path))).ref
    await wait_started(fake, slow)
    pid = p1.runner.load(slow).pid
    # the gateway "dies": its scheduler stops without reaping or signalling (the stand-in
    # worker, unlike the real one, does not ask for a parent-death signal)
    p1.runner.tick = lambda: None
    p1.runner.release_ownership()  # a dead process's lock is released by the kernel
    p2 = await provider(fake)
    assert p2.recovered == [slow]
    assert [e["kind"] for e in events(fake) if e["ref"] == slow][:2] == ["start", "term"]
    p1.runner.slots["cpu"].proc.wait(timeout=5)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert (await wait_state(p2, slow, ("succeeded", "failed"))).state == "succeeded"
    p1.runner.slots["cpu"] = None
    await p1.aclose()
    await p2.aclose()


def test_worker_environment_pins_cuda_devices() -> None:
    from providers.local.runner import PACKAGE_ROOT, worker_env

    env, dev = worker_env("cuda:3")
    assert dev == "cuda" and env["CUDA_VISIBLE_DEVICES"] == "3" and env["HF_HUB_OFFLINE"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(PACKAGE_ROOT)
    env, dev = worker_env("auto")
    assert dev == "auto" and env["TRANSFORMERS_OFFLINE"] == "1" and env["HF_DATASETS_OFFLINE"] == "1"


def test_the_real_worker_exits_at_once_when_its_parent_thread_dies(tmp_path: Path) -> None:
    """The worker asks for SIGTERM on parent death; while still loading it exits 75 at once."""
    import subprocess
    import threading

    job = tmp_path / "job"
    job.mkdir()
    (job / "train.json").write_text(json.dumps({"model_dir": str(tmp_path / "none"), "dataset_dir": str(job),
                                                "config": {"steps": 1}}))
    from providers.local.runner import worker_env

    env, _ = worker_env("cpu")
    box: dict[str, Any] = {}

    def spawn() -> None:
        box["proc"] = subprocess.Popen([sys.executable, "-m", "providers.local.worker", str(job), "--device", "cpu",
                                        "--parent-pid", str(os.getpid())], env=env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while not (job / "progress.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # until the worker has set its parent-death signal

    t = threading.Thread(target=spawn)
    t.start()
    t.join()  # the spawning thread ends: Linux sends the worker SIGTERM
    proc = box["proc"]
    try:
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    if sys.platform.startswith("linux"):
        assert code == 75
    assert json.loads((job / "progress.json").read_text())["phase"] == "starting"


async def test_other_processes_never_signal_the_owners_trainings(fake: dict[str, Any], tmp_path: Path) -> None:
    """Building providers has no side effects: an API-only process and a second engine process on
    the same data dir leave the first one's workers alone (they used to SIGTERM them on
    construction). Jobs submitted or cancelled through them are carried out by the owner, and a
    stand-by takes over when the owner goes."""
    devices = ["cpu", "cuda:7"]  # two slots (the stand-in worker ignores the device)
    owner = await provider(fake, devices=devices)
    slow = (await owner.start_training(tspec("s", word="SLOWW"), dataset(tmp_path))).ref
    await wait_started(fake, slow)
    api_only = await provider(fake, start=False, devices=devices)  # `serve` with run_workers: false
    other = await provider(fake, devices=devices)  # a second `lora-gateway worker`
    assert owner.runner.owner and not other.runner.owner and other.recovered == []
    await asyncio.sleep(1.0)
    assert [e["kind"] for e in events(fake) if e["ref"] == slow] == ["start"]  # nobody signalled it
    assert owner.runner.load(slow).state == "running"

    quick = (await other.start_training(tspec("q", team="B"), dataset(tmp_path))).ref  # via the stand-by
    assert (await wait_state(other, quick, ("succeeded", "failed"))).state == "succeeded"
    assert quick in owner.runner.launched and other.runner.launched == []

    pid = owner.runner.load(slow).pid
    await other.cancel_training(slow)  # the owner kills the worker it started
    assert (await wait_state(api_only, slow, ("failed",))).error == "cancelled"
    deadline = time.monotonic() + 10
    while any(slot is not None for slot in owner.runner.slots.values()):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    await owner.aclose()  # the owner stops: the stand-by takes the directory over
    later = (await other.start_training(tspec("l", team="C"), dataset(tmp_path))).ref
    assert (await wait_state(other, later, ("succeeded", "failed"))).state == "succeeded"
    assert other.runner.owner and later in other.runner.launched
    await other.aclose()
    await api_only.aclose()

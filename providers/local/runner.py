"""Training jobs on disk and the subprocesses that run them: one at a time per device, fairly.

Layout under ``root`` (``<data_dir>/local/trainings``), one directory per job::

    <ref>/job.json          the provider's record (_Job): state, device, pid, error ...
    <ref>/train.json        what the worker trains: model dir, dataset dir, TrainConfig
    <ref>/dataset/          the copied NNN.jpg + NNN.txt files (the gateway deletes its own copy)
    <ref>/progress.json     written by the worker: phase, step, total, loss
    <ref>/result.json       written by the worker at the end: succeeded | failed (+ retryable)
    <ref>/worker.log        the worker's stdout and stderr
    <ref>/output/pytorch_lora_weights.safetensors, <ref>/output/checkpoints/checkpoint-NNNNNNN/

A daemon thread reaps finished workers and starts queued jobs on free devices, in
:class:`~providers.local.queue.FairQueue` order. Only this thread starts workers (Linux ties a
worker's parent-death signal to the thread that forked it). No torch here.

Ownership: several gateway processes may share ``root`` (an API process and workers on one data
dir). Only the process holding an exclusive lock on ``root/.owner.lock`` (:meth:`start`) runs
trainings: it recovers unfinished jobs, starts workers, and picks up jobs other processes
submit (it scans ``root`` for queued jobs). Others only write job records: a submit leaves the
job queued on disk, a cancel marks it cancelled, and the owner kills the worker it started.
A process never signals a process it did not start (orphans of a dead owner excepted: the lock
proves that owner is gone). When the owner dies its lock is released, and a waiting process
takes over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Literal

import msgspec
import structlog

from providers.local.config import OFFLINE_ENV
from providers.local.queue import FairQueue

log = structlog.get_logger()

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE: frozenset[str] = frozenset({"queued", "running"})
EXIT_INTERRUPTED = 75
#: how often a process that does not own the runner directory tries to take it over, and how
#: often the owner scans it for jobs other processes submitted (in scheduler ticks)
OWNER_POLL_TICKS = 10
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding ``providers/``


class _Job(msgspec.Struct, kw_only=True):
    ref: str
    attempt_id: str
    lora_id: str
    team_id: str | None
    trigger_word: str
    seq: int
    submitted_at: float
    requested_steps: int
    steps: int
    rank: int
    image_count: int
    state: JobState = "queued"
    device: str | None = None
    pid: int | None = None
    launches: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    retryable: bool = False


@dataclass
class _Slot:
    ref: str
    proc: subprocess.Popen
    log_file: IO[bytes]


def write_json_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pid_runs_worker(pid: int, job_dir: Path) -> bool:
    """Whether ``pid`` is alive and is the worker of ``job_dir`` (an orphan of a crashed gateway)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in cmdline]
    return "providers.local.worker" in args and str(job_dir) in args


def worker_env(device: str) -> tuple[dict[str, str], str]:
    """The worker's environment and ``--device``: ``cuda:N`` becomes CUDA_VISIBLE_DEVICES=N + ``cuda``."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    if device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        return env, "cuda"
    return env, device


class TrainingRunner:
    """Job records on disk plus the scheduler thread. Thread-safe; all methods are blocking."""

    def __init__(self, root: Path, devices: list[str], *, python: str | None = None, grace_s: float = 30.0,
                 tick_s: float = 0.2, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.python = python or sys.executable
        self.grace_s = grace_s
        self.tick_s = tick_s
        self.clock = clock
        self.slots: dict[str, _Slot | None] = {d: None for d in dict.fromkeys(devices)}
        self.queue = FairQueue()
        self.lock = threading.RLock()
        self.launched: list[str] = []  # refs in the order their workers were started (this process)
        self.recovered: list[str] = []  # unfinished jobs this process took over when it became owner
        self._owner_fd: int | None = None
        self._ticks = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = 0

    # ------------------------------------------------------------------ records

    def job_dir(self, ref: str) -> Path:
        return self.root / ref

    def load(self, ref: str) -> _Job | None:
        try:
            return msgspec.json.decode((self.job_dir(ref) / "job.json").read_bytes(), type=_Job)
        except (OSError, msgspec.DecodeError):
            return None

    def save(self, job: _Job) -> None:
        write_json_atomic(self.job_dir(job.ref) / "job.json", msgspec.json.encode(job))

    @contextlib.contextmanager
    def job_lock(self, ref: str) -> Iterator[None]:
        """Serialise read-modify-write of one job's record across processes (and threads)."""
        with self.lock:
            try:
                fd = os.open(self.job_dir(ref) / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # no such job: nothing to lock
                yield
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)
    def next_seq(self) -> int:
        with self.lock:
            self._seq = max(self._seq + 1, time.time_ns())
            return self._seq

    def progress(self, ref: str) -> dict | None:
        return read_json(self.job_dir(ref) / "progress.json")

    # ------------------------------------------------------------------ ownership

    @property
    def owner(self) -> bool:
        return self._owner_fd is not None

    def _try_own(self) -> bool:
        """Take the runner directory if no live process holds it (non-blocking)."""
        if self._owner_fd is not None:
            return True
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".owner.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._owner_fd = fd
        self.recovered = self.recover()
        log.info("local_runner_owned", root=str(self.root), recovered=len(self.recovered))
        return True

    def release_ownership(self) -> None:
        """Give the runner directory up (``stop`` does; a dead process's lock goes by itself)."""
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None

    def start(self) -> bool:
        """Begin: own the runner directory if it is free (recovering its unfinished jobs) and run
        the scheduler; else stand by and take over when its owner goes. Returns ownership."""
        owned = self._try_own()
        if not owned:
            log.info("local_runner_standby", root=str(self.root),
                     reason="another gateway process owns these trainings; this one takes over if it stops")
        self.ensure_started()
        return owned

    # ------------------------------------------------------------------ lifecycle

    def recover(self) -> list[str]:
        """Requeue every unfinished job found on disk (after a restart); returns their refs."""
        found: list[_Job] = []
        if self.root.is_dir():
            for d in self.root.iterdir():
                if d.name.startswith(".") or not d.is_dir():
                    continue
                job = self.load(d.name)
                if job is not None and job.state in ACTIVE:
                    found.append(job)
        for job in sorted(found, key=lambda j: j.seq):
            if job.state == "running":
                if job.pid is not None and _pid_runs_worker(job.pid, self.job_dir(job.ref)):
                    self._kill_orphan(job.pid, self.job_dir(job.ref))
                job.state, job.device, job.pid = "queued", None, None
                self.save(job)
            with self.lock:
                self._seq = max(self._seq, job.seq)
                self.queue.push(job.ref, job.team_id, job.seq)
            log.info("local_training_recovered", provider_ref=job.ref)
        if found:
            self.ensure_started()
        return [j.ref for j in found]

    def _kill_orphan(self, pid: int, job_dir: Path) -> None:
        """A worker left by a gateway that died: ask it to checkpoint, then make sure it is gone."""
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            return
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            if not _pid_runs_worker(pid, job_dir):  # gone (or a zombie: its cmdline is empty)
                return
            time.sleep(0.1)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass

    def ensure_started(self) -> None:
        with self.lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="local-training-runner", daemon=True)
                self._thread.start()

    def enqueue(self, job: _Job) -> None:
        """A new job on disk: the owner queues it now (another process's owner finds it by scanning)."""
        if not self.owner:
            return
        with self.lock:
            self.queue.push(job.ref, job.team_id, job.seq)
        self._wake.set()

    def cancel(self, ref: str) -> bool:
        """Cancel a queued or running job; False if it had already ended. The worker is killed by
        the process that started it: this one now, or the owner when it sees the record."""
        with self.job_lock(ref):
            job = self.load(ref)
            if job is None or job.state not in ACTIVE:
                return False
            job.state, job.finished_at, job.error, job.retryable = "cancelled", self.clock(), "cancelled", False
            self.save(job)
        with self.lock:
            self.queue.remove(ref)
            self._kill_cancelled()
        log.info("local_training_cancelled", provider_ref=ref)
        self._wake.set()
        return True

    def _kill_cancelled(self) -> None:
        """Kill the workers this process started whose jobs were cancelled (here or elsewhere)."""
        for device, slot in self.slots.items():
            if slot is None:
                continue
            job = self.load(slot.ref)
            if job is None or job.state != "cancelled":
                continue
            self._signal(slot.proc, signal.SIGKILL)
            try:
                slot.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a process SIGKILL does not stop
                pass
            slot.log_file.close()
            self.slots[device] = None
            self.remove_dataset(slot.ref)

    def stop(self) -> None:
        """Stop the thread; ask running workers to checkpoint (SIGTERM), kill them after the grace
        period, and leave their jobs queued so the next start resumes them. Only workers this
        process started are signalled. Ownership is given up last."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=30)
        with self.lock:
            running = [(d, s) for d, s in self.slots.items() if s is not None]
            for _, slot in running:
                self._signal(slot.proc, signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            for _, slot in running:
                try:
                    slot.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self._signal(slot.proc, signal.SIGKILL)
                    slot.proc.wait()
            for device, _ in running:
                self._reap(device, stopping=True)
        self.release_ownership()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - the scheduler must not die
                log.error("local_runner_error", error=f"{type(e).__name__}: {e}")
            self._wake.wait(self.tick_s)
            self._wake.clear()

    def tick(self) -> None:
        """Reap finished workers, kill cancelled ones, then start queued jobs on free devices.
        A process that does not own the directory only tries, now and then, to take it over."""
        self._ticks += 1
        if not self.owner:
            if self._ticks % OWNER_POLL_TICKS == 0:
                self._try_own()
            return
        with self.lock:
            if self._ticks % OWNER_POLL_TICKS == 0:
                self._kill_cancelled()
                self._scan()
            for device, slot in self.slots.items():
                if slot is not None and slot.proc.poll() is not None:
                    self._reap(device)
            for device, slot in self.slots.items():
                if slot is not None or self._stop.is_set():
                    continue
                while (ref := self.queue.pop()) is not None:
                    job = self.load(ref)
                    if job is not None and job.state == "queued":
                        self._launch(device, job)
                        break

    def _scan(self) -> None:
        """Queue jobs other processes submitted (queued on disk, unknown here)."""
        if not self.root.is_dir():
            return
        running = {slot.ref for slot in self.slots.values() if slot is not None}
        for d in self.root.iterdir():
            if d.name.startswith(".") or d.name in self.queue or d.name in running:
                continue
            job = self.load(d.name)
            if job is not None and job.state == "queued":
                self.queue.push(job.ref, job.team_id, job.seq)
                self._seq = max(self._seq, job.seq)

    def _launch(self, device: str, job: _Job) -> None:
        job_dir = self.job_dir(job.ref)
        env, device_arg = worker_env(device)
        (job_dir / "result.json").unlink(missing_ok=True)
        log_file = (job_dir / "worker.log").open("ab")
        cmd = [self.python, "-m", "providers.local.worker", str(job_dir), "--device", device_arg,
               "--parent-pid", str(os.getpid())]
        try:
            proc = subprocess.Popen(cmd, cwd=job_dir, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            log_file.close()
            job.state, job.finished_at = "failed", self.clock()
            job.error, job.retryable = f"local: cannot start the training process: {e}", True
            self.save(job)
            return
        with self.job_lock(job.ref):
            current = self.load(job.ref)
            if current is not None and current.state == "cancelled":  # cancelled elsewhere meanwhile
                self._signal(proc, signal.SIGKILL)
                proc.wait()
                log_file.close()
                return
            job.state, job.device, job.pid = "running", device, proc.pid
            job.launches += 1
            job.started_at = job.started_at or self.clock()
            self.save(job)
        self.slots[device] = _Slot(job.ref, proc, log_file)
        self.launched.append(job.ref)
        log.info("local_training_started", provider_ref=job.ref, device=device, pid=proc.pid, launch=job.launches)

    def _reap(self, device: str, *, stopping: bool = False) -> None:
        slot = self.slots[device]
        assert slot is not None
        self.slots[device] = None
        code = slot.proc.wait()
        slot.log_file.close()
        with self.job_lock(slot.ref):
            self._record_end(slot, code, stopping)

    def _record_end(self, slot: _Slot, code: int, stopping: bool) -> None:
        job = self.load(slot.ref)
        if job is None or job.state != "running":
            return  # cancelled meanwhile
        result = read_json(self.job_dir(job.ref) / "result.json") or {}
        job.pid = None
        if code == 0 and result.get("state") == "succeeded":
            job.state, job.finished_at, job.error = "succeeded", self.clock(), None
        elif code == EXIT_INTERRUPTED or (stopping and result.get("state") != "failed"):
            job.state, job.device = "queued", None  # resumes from its checkpoint
            if not stopping:
                self.queue.push(job.ref, job.team_id, job.seq)
        else:
            job.state, job.finished_at = "failed", self.clock()
            if result.get("state") == "failed":
                job.error = f"local: {result.get('error') or 'training failed'}"
                job.retryable = bool(result.get("retryable", True))
            else:
                how = f"signal {-code}" if code < 0 else f"exit status {code}"
                job.error, job.retryable = f"local: the training process died ({how})", True
        self.save(job)
        if job.state in ("succeeded", "failed"):
            self.remove_dataset(job.ref)
        log.info("local_training_ended", provider_ref=job.ref, state=job.state, exit=code, error=job.error)

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the worker leads its own session / process group
        except (OSError, ProcessLookupError):
            try:
                proc.send_signal(sig)
            except OSError:
                pass

    def remove_dataset(self, ref: str) -> None:
        shutil.rmtree(self.job_dir(ref) / "dataset", ignore_errors=True)

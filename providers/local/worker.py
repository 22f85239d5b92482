"""The training subprocess: ``python -m providers.local.worker JOB_DIR [--device D] [--parent-pid N]``.

It reads ``JOB_DIR/train.json`` (model dir, dataset dir, :class:`TrainConfig`), trains with
:func:`providers.local.trainer.train`, and talks back to the provider only through files:

* ``progress.json`` -- ``{"phase", "step", "total", "loss", "pid", "updated_at"}``, rewritten atomically
  (phases: starting, loading, training, saving, done);
* ``result.json`` -- ``{"state": "succeeded", "weights", "steps", ...}`` or
  ``{"state": "failed", "error", "retryable"}``;
* ``output/pytorch_lora_weights.safetensors`` and ``checkpoints/checkpoint-NNNNNNN/``.

Training goes through :func:`providers.local.trainer.train_resilient`: on an out-of-memory error
it frees the cache and retries once with gradient checkpointing on, then once at
``oom_fallback_resolution`` (when set); an OOM that persists is reported as **not retryable**
(the same job would run out of memory again on this provider, so routing should move on). A
setting this machine cannot honour (``TrainConfigError``) is not retryable either.
``compile`` without a ``compile_cache_dir`` caches the inductor kernels in
``<runner root>/.inductor-cache`` (shared by the jobs, kept across restarts).
Test hook: ``LOCAL_TRAINER_SIMULATE_OOM=K`` makes the first step of each of the first K training
attempts raise ``torch.cuda.OutOfMemoryError``.

Exit status: 0 done, 1 failed (see ``result.json``), 75 interrupted (SIGTERM, SIGINT, or the
gateway process going away: during training after writing a checkpoint at the current step,
while still loading at once), 2 bad invocation. The process asks Linux to send it
SIGTERM when its parent dies, and also watches the parent's pid, so a gateway that crashes
does not leave a training running unsupervised: it checkpoints and stops, and the restarted
provider resumes it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from providers.local.config import OFFLINE_ENV

for _k, _v in OFFLINE_ENV.items():
    os.environ[_k] = _v

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 75


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _die_with_parent(parent_pid: int | None) -> None:
    """SIGTERM on parent death (Linux prctl), checked once here against a race at start."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m providers.local.worker")
    ap.add_argument("job_dir", type=Path)
    ap.add_argument("--device", default=None, help="overrides the device in train.json")
    ap.add_argument("--parent-pid", type=int, default=None)
    args = ap.parse_args(argv)
    job_dir: Path = args.job_dir
    try:
        spec = json.loads((job_dir / "train.json").read_text())
    except (OSError, ValueError) as e:
        print(f"cannot read {job_dir / 'train.json'}: {e}", file=sys.stderr)
        return EXIT_USAGE

    stop = threading.Event()
    training = threading.Event()  # set once the first step runs: from then on, stop = checkpoint + exit

    def on_signal(signum: int, frame: object) -> None:
        if not training.is_set():
            print(f"signal {signum} while loading: exiting (nothing to save yet)", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        print(f"signal {signum}: checkpointing after the current step", file=sys.stderr, flush=True)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _die_with_parent(args.parent_pid)

    def should_stop() -> bool:
        if args.parent_pid is not None and os.getppid() != args.parent_pid:
            stop.set()
        return stop.is_set()

    progress_path = job_dir / "progress.json"
    last = {"t": 0.0}

    def progress(phase: str, step: int, total: int | None, loss: float | None) -> None:
        now = time.time()
        if phase == "training":
            training.set()
            if 0 < step < (total or 0) and now - last["t"] < 0.5:
                return  # at most two writes a second
        last["t"] = now
        write_json(progress_path, {"phase": phase, "step": step, "total": total, "loss": loss,
                                   "pid": os.getpid(), "updated_at": now})

    try:  # a relaunched job keeps showing the step it had reached until its checkpoint is loaded
        before = json.loads(progress_path.read_text())
    except (OSError, ValueError):
        before = {}
    progress("starting", int(before.get("step") or 0), before.get("total"), None)

    def log(msg: str) -> None:
        print(time.strftime("%Y-%m-%dT%H:%M:%S"), msg, flush=True)

    return run_job(job_dir, spec, device=args.device, progress=progress, should_stop=should_stop, log=log)


def run_job(job_dir: Path, spec: dict, *, device: str | None, progress: Callable[..., None],
            should_stop: Callable[[], bool], log: Callable[[str], None]) -> int:
    """Train ``spec`` (train.json's content) in ``job_dir``, write ``result.json``; the exit status.
    (``main`` without the process plumbing: tests call it in-process.)"""
    # heavy imports only now (torch, diffusers), after the signal handlers are in place
    import msgspec

    from providers.local.config import TrainConfig
    from providers.local import trainer

    result_path = job_dir / "result.json"
    try:
        cfg = msgspec.convert(spec["config"], type=TrainConfig)
        if device:
            cfg = msgspec.structs.replace(cfg, device=device)
        if cfg.compile and not cfg.compile_cache_dir:
            cfg = msgspec.structs.replace(cfg, compile_cache_dir=str(job_dir.resolve().parent / ".inductor-cache"))
        hook = None
        simulate = os.environ.get("LOCAL_TRAINER_SIMULATE_OOM")
        if simulate:
            hook = trainer.simulated_oom(int(simulate))
        result = trainer.train_resilient(Path(spec["model_dir"]), Path(spec["dataset_dir"]), cfg, job_dir / "output",
                                         progress=progress, should_stop=should_stop, log=log, step_hook=hook)
    except trainer.TrainingInterrupted as e:
        log(f"interrupted at step {e.step}; the checkpoint is on disk")
        return EXIT_INTERRUPTED
    except trainer.DatasetError as e:
        write_json(result_path, {"state": "failed", "error": f"dataset rejected: {e}", "retryable": False})
        return EXIT_FAILED
    except trainer.TrainConfigError as e:
        write_json(result_path, {"state": "failed", "error": f"config rejected: {e}", "retryable": False})
        return EXIT_FAILED
    except trainer.PersistentOutOfMemory as e:
        log(str(e))
        write_json(result_path, {"state": "failed", "error": str(e), "retryable": False})
        return EXIT_FAILED
    except Exception as e:  # noqa: BLE001 - any failure is reported, the traceback goes to the log
        traceback.print_exc()
        name = type(e).__name__
        if trainer.is_out_of_memory(e):  # outside the training loop (should not happen): not retried either
            write_json(result_path, {"state": "failed", "retryable": False,
                                     "error": f"out of device memory ({name}); not retryable"})
            return EXIT_FAILED
        write_json(result_path, {"state": "failed", "error": f"training failed ({name}: {str(e)[:200]})",
                                 "retryable": True})
        return EXIT_FAILED
    write_json(result_path, {"state": "succeeded", "weights": str(result.weights.relative_to(job_dir)),
                             "steps": result.steps, "resumed_from": result.resumed_from, "loss": result.loss,
                             "seconds": round(result.seconds, 3), "oom_retries": result.oom_retries,
                             "gradient_checkpointing": result.gradient_checkpointing,
                             "resolution": result.resolution,
                             "timings": {k: round(v, 3) for k, v in result.timings.items()}})
    progress("done", result.steps, result.steps, result.loss)
    log(f"done: {result.steps} steps in {result.seconds:.1f}s (resumed from {result.resumed_from})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

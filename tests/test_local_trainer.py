"""The local provider's trainer on a tiny random FLUX (CPU): loss, saved keys, checkpoints, resume."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from providers.local import trainer  # noqa: E402
from tests.tiny_flux import tiny_flux, tiny_lora, tiny_train_config, write_dataset  # noqa: E402,F401
FIXTURES = (tiny_flux, tiny_lora,)  # pytest fixtures, imported to be found (and seen as used)


def test_loss_on_a_fixed_evaluation_set_falls_after_training(tiny_flux: Path, tiny_lora: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "ds")  # the same images and captions the LoRA was trained on
    cfg = tiny_train_config()
    before = trainer.evaluate(tiny_flux, data, cfg)
    after = trainer.evaluate(tiny_flux, data, cfg, lora=tiny_lora)
    assert after < before * 0.95, (before, after)
    assert trainer.evaluate(tiny_flux, data, cfg) == before  # the fixed set really is fixed


def test_saved_file_has_diffusers_lora_keys_on_the_target_modules(tiny_lora: Path) -> None:
    with safe_open(str(tiny_lora), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata() or {}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    assert keys and all(k.startswith("transformer.") for k in keys)
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in keys}
    double = "transformer_blocks.0."
    assert modules == {  # diffusers' train_dreambooth_lora_flux.py default set, matched by suffix
        *(double + m for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                               "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                               "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")),
        # single blocks: q/k/v only (no to_out; proj_mlp / proj_out are not in the list)
        "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.attn.to_v",
    }
    assert {f.dtype for f in load_file(str(tiny_lora)).values()} == {torch.bfloat16}  # save_dtype: bf16 default
    for m in modules:
        a, b = shapes[f"transformer.{m}.lora_A.weight"], shapes[f"transformer.{m}.lora_B.weight"]
        assert a[0] == 8 and b[1] == 8  # rank 8
    if "lora_adapter_metadata" in meta:  # diffusers >= 0.35 keeps the LoraConfig: alpha = rank
        config = json.loads(meta["lora_adapter_metadata"])
        assert config["transformer.r"] == 8 and config["transformer.lora_alpha"] == 8
    weights = load_file(str(tiny_lora))
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k)  # B left zero init


def test_target_modules_and_batch_size_are_configurable(tiny_flux: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "ds", n=2)
    cfg = tiny_train_config(steps=2, target_modules=["to_q"], checkpoint_every=100, batch_size=2, save_dtype="fp32")
    result = trainer.train(tiny_flux, data, cfg, tmp_path / "out")
    with safe_open(str(result.weights), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".to_q.lora_" in k for k in keys)
    assert {v.dtype for v in load_file(str(result.weights)).values()} == {torch.float32}
    with pytest.raises(ValueError, match="match no module|not found"):
        trainer.train(tiny_flux, data, tiny_train_config(steps=1, target_modules=["nope"]), tmp_path / "out2")


def test_interrupted_run_resumes_from_its_checkpoint_to_the_same_weights(tiny_flux: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "ds")
    cfg = tiny_train_config(steps=6, checkpoint_every=2)
    straight = trainer.train(tiny_flux, data, cfg, tmp_path / "straight")
    assert straight.resumed_from == 0

    out = tmp_path / "stopped"
    done: list[int] = []
    stop_after = 3

    def progress(phase: str, step: int, total: int, loss: float | None) -> None:
        if phase == "training":
            done.append(step)

    with pytest.raises(trainer.TrainingInterrupted) as info:
        trainer.train(tiny_flux, data, cfg, out, progress=progress, should_stop=lambda: bool(done) and done[-1] >= stop_after)
    assert info.value.step == 3
    ckpt = trainer.latest_checkpoint(out / "checkpoints", cfg)
    assert ckpt is not None and ckpt[0] == 3  # a checkpoint was written on the way out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-0000002", "checkpoint-0000003"]
    assert {p.name for p in ckpt[1].iterdir()} == {"lora.safetensors", "optimizer.pt", "rng.pt", "state.json"}
    assert not (out / trainer.WEIGHTS_NAME).exists()

    resumed = trainer.train(tiny_flux, data, cfg, out)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    a, b = load_file(str(straight.weights)), load_file(str(resumed.weights))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical: counter-based RNG + restored optimizer state
    assert not (out / "checkpoints").exists()  # removed once the weights are saved
    again = trainer.train(tiny_flux, data, cfg, out)  # relaunched after finishing: no second run
    assert again.resumed_from == 6 and again.weights == resumed.weights


def test_checkpoint_of_other_settings_is_not_resumed(tiny_flux: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "ds", n=2)
    cfg = tiny_train_config(steps=4, checkpoint_every=2)
    steps: list[int] = []
    with pytest.raises(trainer.TrainingInterrupted):
        trainer.train(tiny_flux, data, cfg, tmp_path / "out", should_stop=lambda: bool(steps),
                      progress=lambda phase, step, total, loss: steps.append(step) if step else None)
    assert trainer.latest_checkpoint(tmp_path / "out" / "checkpoints", cfg)[0] == 1
    other = tiny_train_config(steps=4, checkpoint_every=2, rank=4)
    assert trainer.latest_checkpoint(tmp_path / "out" / "checkpoints", other) is None
    assert trainer.train(tiny_flux, data, other, tmp_path / "out").resumed_from == 0


def test_batches_cover_every_example_each_epoch() -> None:
    seen = [trainer.batch_indices(5, step, 2, seed=7) for step in range(5)]  # 10 picks = 2 epochs
    flat = [i for batch in seen for i in batch]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:]) == list(range(5))
    assert seen == [trainer.batch_indices(5, step, 2, seed=7) for step in range(5)]


def test_bad_dataset_is_a_dataset_error(tiny_flux: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(trainer.DatasetError):
        trainer.train(tiny_flux, tmp_path / "empty", tiny_train_config(steps=1), tmp_path / "out")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(trainer.DatasetError):
        trainer.train(tiny_flux, bad, tiny_train_config(steps=1), tmp_path / "out")


def test_device_and_dtype_are_chosen_at_run_time() -> None:
    cpu = torch.device("cpu")
    assert trainer.resolve_dtype("auto", cpu) == torch.float32
    assert trainer.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert trainer.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert trainer.resolve_device("auto").type == expected


# --------------------------------------------------------------------------- quality defaults, speed switches

SWITCH_STEPS = 20


@pytest.fixture(scope="module")
def fixed_set(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The dataset, its base-model evaluation losses (per dtype) and a stock diffusers pipeline."""
    from diffusers import FluxPipeline

    data = write_dataset(tmp_path_factory.mktemp("switch-ds"))
    base = {dtype: trainer.evaluate(tiny_flux, data, tiny_train_config(dtype=dtype)) for dtype in ("float32", "bfloat16")}
    pipe = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    return {"data": data, "before": base, "pipe": pipe}


def assert_trains_and_loads(tiny_flux: Path, fixed_set: dict, out: Path, **switches: object) -> trainer.TrainResult:
    """Training with ``switches`` lowers the fixed evaluation loss, and stock diffusers loads the file."""
    cfg = tiny_train_config(steps=SWITCH_STEPS, **switches)
    logs: list[str] = []
    result = trainer.train(tiny_flux, fixed_set["data"], cfg, out, log=logs.append)
    result.logs = logs  # type: ignore[attr-defined]
    before = fixed_set["before"][cfg.dtype if cfg.dtype != "auto" else "float32"]
    after = trainer.evaluate(tiny_flux, fixed_set["data"], cfg, lora=result.weights)
    assert after < before * 0.95, (switches, before, after)
    pipe, name = fixed_set["pipe"], f"sw{abs(hash(str(out))) % 10**8}"
    pipe.load_lora_weights(str(result.weights.parent), weight_name=result.weights.name, adapter_name=name,
                           local_files_only=True)
    try:
        assert name in pipe.get_list_adapters().get("transformer", [])
    finally:
        pipe.delete_adapters(name)
    return result


def test_sync_every_defers_the_host_reads_and_trains_the_same_weights(tiny_flux: Path, fixed_set: dict,
                                                                      tmp_path: Path) -> None:
    plain = trainer.train(tiny_flux, fixed_set["data"], tiny_train_config(steps=SWITCH_STEPS, checkpoint_every=100),
                          tmp_path / "plain")
    seen: list[float | None] = []
    result = trainer.train(tiny_flux, fixed_set["data"],
                           tiny_train_config(steps=SWITCH_STEPS, sync_every=8, checkpoint_every=100),
                           tmp_path / "sync", progress=lambda phase, step, total, loss: seen.append(loss)
                           if phase == "training" and step else None)
    # on CPU the device generator is the CPU stream: the same numbers, so the same weights
    a, b = load_file(str(plain.weights)), load_file(str(result.weights))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert result.loss == plain.loss and result.first_loss == plain.first_loss
    # the loss is read only every 8 steps (and at the end): progress repeats the last value read
    assert seen[:7] == [None] * 7 and seen[7] is not None and len(set(seen[8:15])) == 1 and seen[-1] == result.loss


def test_sync_every_still_catches_a_non_finite_loss(tiny_flux: Path, fixed_set: dict, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real = trainer.flow_matching_loss
    monkeypatch.setattr(trainer, "flow_matching_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(FloatingPointError, match="at step 1"):
        trainer.train(tiny_flux, fixed_set["data"], tiny_train_config(steps=3, sync_every=2), tmp_path / "o")


@pytest.mark.parametrize("switches", [
    pytest.param({"gradient_checkpointing": True}, id="checkpointing"),
    pytest.param({"attention_backend": "_native_math"}, id="attention_backend"),
    pytest.param({"fused_adamw": True}, id="fused_adamw"),
    pytest.param({"dtype": "bfloat16", "lora_bf16": True}, id="lora_bf16"),
    pytest.param({"sync_every": 4, "gradient_checkpointing": True, "fused_adamw": True}, id="combined"),
])
def test_speed_switch_still_trains_and_saves_loadable_weights(tiny_flux: Path, fixed_set: dict, tmp_path: Path,
                                                              switches: dict) -> None:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    result = assert_trains_and_loads(tiny_flux, fixed_set, tmp_path / "out", **switches)
    assert _AttentionBackendRegistry._active_backend == active  # the process-wide default is left as it was
    if "attention_backend" in switches:
        assert "attention backend: _native_math" in result.logs  # type: ignore[attr-defined]
    if switches.get("gradient_checkpointing"):
        assert result.gradient_checkpointing is True


def test_lora_bf16_runs_the_lora_math_in_bf16_with_float32_masters(tiny_flux: Path) -> None:
    from diffusers import FluxTransformer2DModel

    cfg = tiny_train_config(dtype="bfloat16", lora_bf16=True)
    model = trainer.add_lora(FluxTransformer2DModel.from_pretrained(
        tiny_flux, subfolder="transformer", local_files_only=True, torch_dtype=torch.bfloat16), cfg)
    lora_a = model.transformer_blocks[0].attn.to_q.lora_A["default"]
    assert lora_a.weight.dtype == torch.float32  # master weights
    seen: list[torch.dtype] = []
    lora_a.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    x = torch.randn(1, 4, 32, dtype=torch.bfloat16)
    with trainer.lora_autocast(cfg, torch.device("cpu"), torch.bfloat16):
        model.transformer_blocks[0].attn.to_q(x)
    with trainer.lora_autocast(msgspec_replace(cfg, lora_bf16=False), torch.device("cpu"), torch.bfloat16):
        model.transformer_blocks[0].attn.to_q(x)
    assert seen == [torch.bfloat16, torch.float32]
    assert isinstance(trainer.lora_autocast(cfg, torch.device("cpu"), torch.float32), contextlib.nullcontext)


def msgspec_replace(cfg: object, **kw: object) -> object:
    import msgspec

    return msgspec.structs.replace(cfg, **kw)


def test_compile_wires_regional_compilation_of_the_repeated_blocks(tiny_flux: Path, fixed_set: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # inductor on a 2-core CPU takes minutes: a registered backend counts the graphs it is given and
    # hands them to aot_eager (the real AOTAutograd forward/backward tracing, without codegen)
    from torch._dynamo import lookup_backend, register_backend, reset

    graphs: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(len(gm.graph.nodes))
        return lookup_backend("aot_eager")(gm, example_inputs)

    register_backend(counting, name="lora_gateway_test_counting")
    cache = tmp_path / "inductor-cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset")  # restored after the test
    try:
        result = assert_trains_and_loads(tiny_flux, fixed_set, tmp_path / "out", compile=True,
                                         compile_backend="lora_gateway_test_counting", compile_cache_dir=str(cache))
    finally:
        reset()
    assert len(graphs) >= 2  # one per block (a double and a single one), compiled once and reused
    assert any("compile: 2 blocks" in m for m in result.logs)  # type: ignore[attr-defined]
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache) and cache.is_dir()


def test_attention_backend_errors_are_clear_config_errors(tiny_flux: Path, fixed_set: dict, tmp_path: Path) -> None:
    with pytest.raises(trainer.TrainConfigError, match="'no-such-backend' cannot be used"):
        trainer.train(tiny_flux, fixed_set["data"], tiny_train_config(steps=1, attention_backend="no-such-backend"),
                      tmp_path / "o")

    class Old:  # a diffusers transformer from before set_attention_backend
        pass

    with pytest.raises(trainer.TrainConfigError, match="needs diffusers >= 0.35"):
        trainer.set_attention_backend(Old(), "flash")


def test_fused_adamw_is_used_where_torch_has_the_kernel_and_falls_back_elsewhere() -> None:
    layer = torch.nn.Linear(4, 4)
    cfg = tiny_train_config(fused_adamw=True)
    opt = trainer.make_optimizer(layer, cfg)
    assert opt.defaults["fused"] is True  # CPU has a fused AdamW kernel since torch 2.4
    logs: list[str] = []
    elsewhere = torch.nn.Linear(4, 4, device="meta")  # a device without a fused kernel: the default AdamW
    opt = trainer.make_optimizer(elsewhere, cfg, logs.append)
    assert not opt.defaults.get("fused") and logs and "no fused AdamW kernel for meta" in logs[0]
    opt = trainer.make_optimizer(layer, msgspec_replace(cfg, fused_adamw=False), logs.append)
    assert not opt.defaults.get("fused") and len(logs) == 1


def test_auto_checkpointing_decides_by_the_estimated_activation_memory(tiny_flux: Path, fixed_set: dict,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    flux_dev = type("C", (), {"config": type("K", (), dict(num_attention_heads=24, attention_head_dim=128,
                                                           num_layers=19, num_single_layers=38))})()
    at_1024 = trainer.activation_bytes(flux_dev, 4096, 512, 1, torch.bfloat16)
    at_512 = trainer.activation_bytes(flux_dev, 1024, 512, 1, torch.bfloat16)
    assert 10 * 2**30 < at_512 < at_1024 < 60 * 2**30  # ~10 and ~30 GiB: fits an 80 GB GPU; checkpointing stays off
    assert trainer.decide_checkpointing("auto", at_1024, 80 * 2**30) is False
    assert trainer.decide_checkpointing("auto", at_1024, 24 * 2**30) is True
    assert trainer.decide_checkpointing("auto", 1, None) is True  # unknown free memory: the safe choice
    assert trainer.decide_checkpointing(False, at_1024, 1) is False and trainer.decide_checkpointing(True, 1, 2**40)
    data, cfg = fixed_set["data"], tiny_train_config(steps=2, gradient_checkpointing="auto")
    assert trainer.train(tiny_flux, data, cfg, tmp_path / "roomy").gradient_checkpointing is False
    monkeypatch.setattr(trainer, "free_device_memory", lambda device: 1024)
    logs: list[str] = []
    assert trainer.train(tiny_flux, data, cfg, tmp_path / "tight", log=logs.append).gradient_checkpointing is True
    assert any("gradient checkpointing auto" in m and m.endswith(": on") for m in logs)


# --------------------------------------------------------------------------- aspect-ratio buckets


def test_bucket_shapes_are_multiples_of_16_near_the_side_squared() -> None:
    for side in (512, 768, 1024):
        shapes = trainer.bucket_shapes(side)
        assert (side, side) in shapes and len(shapes) == len(trainer.BUCKET_RATIOS)
        for w, h in shapes:
            assert w % 16 == 0 and h % 16 == 0 and abs(w * h / side**2 - 1) < 0.1, (side, w, h)
    sides = [512, 768, 1024]
    assert trainer.assign_bucket(1024, 1024, sides) == (1024, 1024)
    assert trainer.assign_bucket(4000, 3000, sides) == trainer.assign_bucket(1365, 1024, sides)  # 4:3 at 1024
    w, h = trainer.assign_bucket(1024, 768, sides)  # 786k px: reaches 768^2, not 1024^2
    assert abs(w * h / 768**2 - 1) < 0.1 and abs(w / h - 4 / 3) < 0.05
    w, h = trainer.assign_bucket(600, 1200, sides)  # 1:2 portrait, 720k px
    assert h > w and abs(w / h - 0.5) < 0.05 and abs(w * h / 768**2 - 1) < 0.1
    assert trainer.assign_bucket(100, 100, sides) == (512, 512)  # smaller than every side: the smallest


def test_bucket_batches_stay_within_a_bucket_and_cover_every_example_each_epoch() -> None:
    counts = [3, 1, 4]
    per_epoch = 2 + 1 + 2  # ceil(n / 2) per bucket
    batches = [trainer.bucket_batch(counts, step, 2, seed=3) for step in range(2 * per_epoch)]
    for epoch in (0, 1):
        seen = sorted((b, i) for b, idx in batches[epoch * per_epoch:(epoch + 1) * per_epoch] for i in idx)
        assert seen == [(b, i) for b, n in enumerate(counts) for i in range(n)]
    assert batches == [trainer.bucket_batch(counts, step, 2, seed=3) for step in range(2 * per_epoch)]
    assert batches != [trainer.bucket_batch(counts, step, 2, seed=4) for step in range(2 * per_epoch)]


def write_mixed_dataset(directory: Path) -> Path:
    """Landscape (2:1 twice), portrait (1:2) and square images: three buckets at side 32."""
    from tests.images import make_image

    directory.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate([(96, 48), (64, 32), (48, 96), (40, 40)], 1):
        (directory / f"{i:03d}.jpg").write_bytes(make_image(seed=i, size=size))
        (directory / f"{i:03d}.txt").write_text("a photo of K7XQZ, a person smiling in the garden", "utf-8")
    return directory


def test_buckets_train_each_image_at_its_aspect_ratio_and_resume_exactly(tiny_flux: Path, tmp_path: Path) -> None:
    data = write_mixed_dataset(tmp_path / "ds")
    cfg = tiny_train_config(steps=12, checkpoint_every=4, batch_size=2, buckets=[32])
    enc = trainer.encode_dataset(tiny_flux, trainer.read_dataset(data), cfg, torch.device("cpu"), torch.float32)
    assert isinstance(enc, trainer.Bucketed)
    # 2:1 and 1:2 go to 48x32 / 32x48 (at side 32 the 2:1 bucket is 48x16, further from 2 in log ratio)
    assert dict(zip(enc.sizes, enc.members)) == {(32, 32): [3], (32, 48): [2], (48, 32): [0, 1]}
    assert [tuple(p.latent_mean.shape[2:]) for p in enc.parts] == [(4, 4), (6, 4), (4, 6)]  # (h, w) / 8

    before = trainer.evaluate(tiny_flux, data, cfg)
    straight = trainer.train(tiny_flux, data, cfg, tmp_path / "straight")
    assert trainer.evaluate(tiny_flux, data, cfg, lora=straight.weights) < before * 0.95
    done: list[int] = []
    with pytest.raises(trainer.TrainingInterrupted):
        trainer.train(tiny_flux, data, cfg, tmp_path / "stopped", should_stop=lambda: bool(done) and done[-1] >= 5,
                      progress=lambda phase, step, total, loss: done.append(step) if phase == "training" else None)
    resumed = trainer.train(tiny_flux, data, cfg, tmp_path / "stopped")
    assert resumed.resumed_from == 5
    a, b = load_file(str(straight.weights)), load_file(str(resumed.weights))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- out of memory


def run_worker(tmp_path: Path, tiny_flux: Path, monkeypatch: pytest.MonkeyPatch, simulate: int, **cfg: object
               ) -> tuple[int, dict, list[str]]:
    import msgspec

    from providers.local import worker

    job = tmp_path / "job"
    job.mkdir()
    spec = {"model_dir": str(tiny_flux), "dataset_dir": str(write_dataset(tmp_path / "ds", n=2)),
            "config": msgspec.to_builtins(tiny_train_config(**{"steps": 3, **cfg}))}
    monkeypatch.setenv("LOCAL_TRAINER_SIMULATE_OOM", str(simulate))
    logs: list[str] = []
    code = worker.run_job(job, spec, device="cpu", progress=lambda *a: None, should_stop=lambda: False, log=logs.append)
    return code, json.loads((job / "result.json").read_text()), logs


def test_an_oom_is_retried_with_gradient_checkpointing_and_recovers(tiny_flux: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    code, result, logs = run_worker(tmp_path, tiny_flux, monkeypatch, simulate=1, gradient_checkpointing=False)
    assert code == 0 and result["state"] == "succeeded", result
    assert result["oom_retries"] == 1 and result["gradient_checkpointing"] is True and result["resolution"] == 32
    assert any("retrying with gradient checkpointing on" in m for m in logs)


def test_an_oom_falls_back_to_the_lower_resolution(tiny_flux: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    code, result, logs = run_worker(tmp_path, tiny_flux, monkeypatch, simulate=2, oom_fallback_resolution=16)
    assert code == 0 and result["state"] == "succeeded", result
    assert (result["oom_retries"], result["gradient_checkpointing"], result["resolution"]) == (2, True, 16)


def test_an_oom_that_persists_fails_as_not_retryable(tiny_flux: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    code, result, logs = run_worker(tmp_path, tiny_flux, monkeypatch, simulate=99, oom_fallback_resolution=16)
    assert code == 1 and result["state"] == "failed" and result["retryable"] is False
    assert "out of device memory" in result["error"] and "not retryable" in result["error"]
    assert "gradient checkpointing" in result["error"] and "16 px" in result["error"]
    assert sum("retrying" in m for m in logs) == 2  # checkpointing, then the lower resolution, then give up
    assert not (tmp_path / "job" / "output" / trainer.WEIGHTS_NAME).exists()


def test_out_of_memory_is_recognised_by_type_or_message() -> None:
    assert trainer.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert trainer.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not trainer.is_out_of_memory(RuntimeError("shape mismatch"))
    cfg = tiny_train_config(gradient_checkpointing=True, oom_fallback_resolution=16)
    assert [c.resolution for c, _ in trainer.oom_attempts(cfg)] == [32, 16]  # already on: no checkpointing retry
    assert len(trainer.oom_attempts(tiny_train_config())) == 2

"""The local provider's trainer on a tiny random FLUX (CPU): loss, saved keys, checkpoints, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from providers.local import trainer  # noqa: E402
from tests.tiny_flux import tiny_flux, tiny_lora, tiny_train_config, write_dataset  # noqa: E402,F401


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
    assert modules == {
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
        "transformer_blocks.0.attn.to_out.0",
        "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.attn.to_v",  # single blocks have no to_out (proj_out is outside attn)
    }
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
    cfg = tiny_train_config(steps=2, target_modules=["to_q"], checkpoint_every=100, batch_size=2)
    result = trainer.train(tiny_flux, data, cfg, tmp_path / "out")
    with safe_open(str(result.weights), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".to_q.lora_" in k for k in keys)
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

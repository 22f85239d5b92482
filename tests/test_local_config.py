"""The local provider without its heavy dependencies: lazy imports, registration, config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from providers.base import TrainingSpec
from providers.local import LocalConfig, LocalProvider, TrainConfig
from providers.local.provider import train_config

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy")


def test_importing_and_registering_the_provider_loads_no_torch(tmp_path: Path) -> None:
    # a fresh interpreter: this test session may have imported torch already for other tests
    code = f"""
import json, sys
from plugins import manager
from providers.base import ProviderSetup
pm = manager.make_plugin_manager(load_entrypoints=False)  # a default plugin
cls = manager.providers(pm)["local"]
setup = ProviderSetup(storage=None, data_dir=__import__("pathlib").Path({str(tmp_path)!r}), public_base_url=None,
                      http_client=lambda **kw: None)
p = cls(cls.config_type(model_dir="/nowhere"), setup)
print(json.dumps({{"name": cls.name, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"name": "local", "heavy": []}


def test_the_provider_declares_what_it_can_do(tmp_path: Path) -> None:
    from tests.tiny_flux import make_local_provider

    p = make_local_provider(tmp_path, tmp_path / "model", cost_per_training=1.5, cost_per_image=0.01)
    caps = p.capabilities
    assert p.name == "local" and LocalProvider.config_type is LocalConfig
    assert caps.can_lookup and caps.can_cancel and not caps.webhooks_in
    assert caps.training.dataset_input == "directory" and caps.training.produces_artifact
    assert caps.training.min_steps <= 500 and caps.training.max_steps >= 3000
    assert caps.training.min_rank <= 8 and caps.training.max_rank >= 64
    assert caps.inference.accepts_lora_file and caps.inference.max_outputs == 4
    assert caps.inference.output_formats == frozenset({"png", "jpg", "webp"})
    assert (caps.cost.per_training, caps.cost.per_image) == (1.5, 0.01)


def test_config_defaults_and_validation() -> None:
    cfg = msgspec.convert({"model_dir": "/m"}, type=LocalConfig)
    assert cfg.devices == ["auto"] and cfg.dtype == "auto" and cfg.resolution == 512
    assert cfg.max_steps is None and cfg.learning_rate == 1e-4 and cfg.batch_size == 1
    assert cfg.checkpoint_every == 100 and cfg.target_modules == [
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
    # quality default: bf16 file; buckets and every speed switch off (unchanged until measured on a GPU)
    assert cfg.save_dtype == "bf16" and cfg.buckets is None and cfg.gradient_checkpointing is True
    assert (cfg.compile, cfg.compile_backend, cfg.compile_cache_dir, cfg.attention_backend) == (False, "inductor", None, None)
    assert (cfg.lora_bf16, cfg.sync_every, cfg.fused_adamw, cfg.oom_fallback_resolution) == (False, 1, False, None)
    assert cfg.seed == 0 and cfg.adapter_cache == 4 and cfg.python is None
    assert (cfg.cost_per_training, cfg.cost_per_image) == (0.0, 0.0)
    for bad in ({"resolution": 500}, {"dtype": "float16"}, {"devices": []}, {"devices": ["tpu"]},
                {"unknown": 1}, {"max_steps": 0}, {"target_modules": []}, {"adapter_cache": 0},
                {"save_dtype": "fp16"}, {"buckets": []}, {"buckets": [500]}, {"gradient_checkpointing": "sometimes"},
                {"sync_every": 0}, {"oom_fallback_resolution": 100}, {"compile_backend": ""}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"model_dir": "/m", **bad}, type=LocalConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({}, type=LocalConfig)  # model_dir is required


def test_train_config_takes_the_request_capped_by_max_steps() -> None:
    spec = TrainingSpec(attempt_id="a", lora_id="l", name="n", subject_kind="person", steps=1200, lora_rank=16,
                        trigger_word="K7XQZ")
    cfg = LocalConfig(model_dir="/m", max_steps=4, resolution=256, gradient_checkpointing=False,
                      target_modules=["to_q"], train_guidance_scale=1.0)
    t = train_config(cfg, spec)
    assert isinstance(t, TrainConfig)
    assert (t.steps, t.rank, t.lora_alpha, t.resolution, t.gradient_checkpointing) == (4, 16, 16.0, 256, False)
    assert t.target_modules == ["to_q"] and t.device == "auto"
    assert train_config(LocalConfig(model_dir="/m"), spec).steps == 1200
    assert train_config(LocalConfig(model_dir="/m", max_steps=5000), spec).steps == 1200
    # what a checkpoint must share with a run to resume it: not the device or checkpoint cadence
    assert t.resume_key() == msgspec.structs.replace(t, device="cuda", checkpoint_every=7).resume_key()
    assert t.resume_key() != msgspec.structs.replace(t, rank=8).resume_key()
    # speed switches do not change what a checkpoint means; buckets do
    fast = msgspec.structs.replace(t, gradient_checkpointing="auto", compile=True, attention_backend="native",
                                   lora_bf16=True, sync_every=8, fused_adamw=True, save_dtype="fp32",
                                   oom_fallback_resolution=128)
    assert t.resume_key() == fast.resume_key()
    assert t.resume_key() != msgspec.structs.replace(t, buckets=[256]).resume_key()
    assert "buckets" not in t.resume_key()  # absent when off: checkpoints written before buckets existed still fit
    switches = dict(gradient_checkpointing="auto", save_dtype="fp32", buckets=[256, 512], compile=True,
                    compile_backend="eager", compile_cache_dir="/c", attention_backend="native", lora_bf16=True,
                    sync_every=4, fused_adamw=True, oom_fallback_resolution=256)
    passed = train_config(LocalConfig(model_dir="/m", **switches), spec)
    assert {k: getattr(passed, k) for k in switches} == switches  # every knob reaches the trainer

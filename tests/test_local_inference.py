"""The local provider's generation on a tiny random FLUX (CPU): strength, kohya files, LRU, seeds."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from providers.base import GenerationSpec, LoraHandle, ProviderError, ProviderRejected  # noqa: E402
from tests.tiny_flux import TRIGGER, make_local_provider, tiny_flux, tiny_lora  # noqa: E402,F401
FIXTURES = (tiny_flux, tiny_lora,)  # pytest fixtures, imported to be found (and seen as used)

SIZE = 64


@pytest.fixture(scope="module")
def hosts(tiny_flux: Path) -> Any:
    """Warm pipelines shared by this module's providers (loading once is part of what is tested)."""
    from providers.local.inference import PipelineHost

    return [PipelineHost(tiny_flux, "cpu", "auto", adapter_cache=2, max_sequence_length=16)]


@pytest.fixture
def provider(tmp_path: Path, tiny_flux: Path, hosts: Any) -> Any:
    p = make_local_provider(tmp_path, tiny_flux, adapter_cache=2)
    p.hosts = hosts
    return p


def spec(**kw: Any) -> GenerationSpec:
    base: dict[str, Any] = dict(attempt_id="g-1", job_id="job-1", prompt=f"a photo of {TRIGGER} in the garden",
                                width=SIZE, height=SIZE, seed=7, num_inference_steps=4, guidance_scale=3.5)
    return GenerationSpec(**{**base, **kw})


def handle(path: Path | None) -> LoraHandle:
    return LoraHandle(lora_id="lora-1", trigger_word=TRIGGER, artifact_path=path)


async def pixels(provider: Any, lora: Path | None, strength: float = 1.0, **kw: Any) -> np.ndarray:
    if lora is None:  # the base model, through the same warm pipeline
        from providers.local.inference import GenerateRequest

        s = spec(**kw)
        req = GenerateRequest(prompt=s.prompt, width=s.width, height=s.height, seed=s.seed or 0,
                              num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale)
        data = (await provider.run_on_host(lambda host: host.generate(req, None)))[0]
    else:
        status = await provider.generate(spec(lora_strength=strength, **kw), handle(lora))
        assert status.state == "succeeded" and len(status.images) == 1
        data = status.images[0].data
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


async def test_strength_zero_is_the_base_model_and_strength_scales_the_effect(provider: Any, tiny_lora: Path) -> None:
    base = await pixels(provider, None)
    zero = await pixels(provider, tiny_lora, 0.0)
    half = await pixels(provider, tiny_lora, 0.5)
    full = await pixels(provider, tiny_lora, 1.0)
    assert np.array_equal(zero, base)  # pixel-identical with the same seed
    assert 0 < diff(half, base) < diff(full, base)
    assert np.array_equal(await pixels(provider, tiny_lora, 1.0), full)  # deterministic
    assert np.array_equal(await pixels(provider, None), base)  # the LoRA is switched off again for the base
    assert provider.hosts[0].loads == 1  # the pipeline stayed warm


def to_kohya(sd: dict[str, Any]) -> dict[str, Any]:
    """diffusers/peft keys of the double blocks' image attention -> sd-scripts (kohya) keys.

    kohya fuses q, k, v into one ``img_attn_qkv`` LoRA: the three A matrices are stacked along
    the rank (``lora_down`` [3r, dim]) and the B matrices placed block-diagonally (``lora_up``
    [3*dim, 3r]), with ``alpha = 3r`` so that the scale alpha/rank stays 1.
    """
    out: dict[str, Any] = {}
    blocks = sorted({int(k.split(".")[2]) for k in sd if k.startswith("transformer.transformer_blocks.")})
    for i in blocks:
        p = f"transformer.transformer_blocks.{i}.attn."
        a = [sd[f"{p}to_{x}.lora_A.weight"] for x in "qkv"]
        b = [sd[f"{p}to_{x}.lora_B.weight"] for x in "qkv"]
        rank = a[0].shape[0]
        k = f"lora_unet_double_blocks_{i}_img_attn_qkv"
        out[f"{k}.lora_down.weight"] = torch.cat(a, dim=0).contiguous()
        out[f"{k}.lora_up.weight"] = torch.block_diag(*b).contiguous()
        out[f"{k}.alpha"] = torch.tensor(float(3 * rank))
        k = f"lora_unet_double_blocks_{i}_img_attn_proj"
        out[f"{k}.lora_down.weight"] = sd[f"{p}to_out.0.lora_A.weight"].contiguous()
        out[f"{k}.lora_up.weight"] = sd[f"{p}to_out.0.lora_B.weight"].contiguous()
        out[f"{k}.alpha"] = torch.tensor(float(rank))
    return out


async def test_a_kohya_keyed_file_loads_and_acts_like_the_diffusers_one(provider: Any, tiny_lora: Path,
                                                                        tmp_path: Path) -> None:
    # diffusers' kohya converter hard-codes FLUX.1's single-block widths (3072/12288), so the tiny
    # model's comparison uses the double blocks only, in both layouts
    sd = load_file(str(tiny_lora))
    image_attention = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.0.")  # what to_kohya converts
    double = {k: v for k, v in sd.items()
              if k.startswith("transformer.transformer_blocks.") and any(m in k for m in image_attention)}
    assert double and len(double) < len(sd)
    save_file(double, str(tmp_path / "diffusers.safetensors"))
    kohya = to_kohya(double)
    assert all(k.startswith("lora_unet_") for k in kohya)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    from gateway.artifacts import inspect_artifact

    assert inspect_artifact(tmp_path / "kohya.safetensors").format == "kohya"

    base = await pixels(provider, None)
    via_diffusers = await pixels(provider, tmp_path / "diffusers.safetensors")
    via_kohya = await pixels(provider, tmp_path / "kohya.safetensors")
    assert diff(via_diffusers, base) > 0
    assert np.abs(via_kohya - via_diffusers).max() <= 2  # the same change, up to float rounding
    assert diff(via_kohya, via_diffusers) < 0.1 * diff(via_diffusers, base)
    half = await pixels(provider, tmp_path / "kohya.safetensors", 0.5)
    assert 0 < diff(half, base) < diff(via_kohya, base)


async def test_adapters_are_kept_in_an_lru_of_configured_size(provider: Any, tiny_lora: Path, tmp_path: Path) -> None:
    host = provider.hosts[0]
    paths = []
    for i in range(3):
        p = tmp_path / f"lora{i}" / "w.safetensors"
        p.parent.mkdir()
        shutil.copyfile(tiny_lora, p)
        paths.append(p)
    first = await pixels(provider, paths[0])
    await pixels(provider, paths[1])
    await pixels(provider, paths[2])
    loaded = {n for names in host.pipe.get_list_adapters().values() for n in names}
    assert len(host.adapters) == 2 and loaded == set(host.adapters)
    from providers.local.inference import adapter_name_for

    assert adapter_name_for(paths[0]) not in loaded  # least recently used: deleted
    assert np.array_equal(await pixels(provider, paths[0]), first)  # reloaded on demand, same result
    assert adapter_name_for(paths[1]) not in set(host.adapters)


async def test_outputs_formats_sizes_and_seeds(provider: Any, tiny_lora: Path) -> None:
    s = await provider.generate(spec(num_outputs=2, output_format="webp", width=48, height=32), handle(tiny_lora))
    imgs = [Image.open(io.BytesIO(i.data)) for i in s.images]
    assert [(i.format, i.size) for i in imgs] == [("WEBP", (48, 32))] * 2
    s = await provider.generate(spec(output_format="jpg"), handle(tiny_lora))
    assert Image.open(io.BytesIO(s.images[0].data)).format == "JPEG"

    a = await provider.generate(spec(seed=None, attempt_id="att-A"), handle(tiny_lora))
    again = await provider.generate(spec(seed=None, attempt_id="att-A"), handle(tiny_lora))
    other = await provider.generate(spec(seed=None, attempt_id="att-B"), handle(tiny_lora))
    assert a.images[0].data == again.images[0].data  # no seed: derived from the attempt id
    assert a.images[0].data != other.images[0].data


async def test_bad_requests_and_unusable_loras_are_rejected(provider: Any, tmp_path: Path) -> None:
    with pytest.raises(ProviderRejected):
        await provider.generate(spec(width=72), handle(None))
    with pytest.raises(ProviderRejected):
        await provider.generate(spec(num_outputs=5), handle(None))
    with pytest.raises(ProviderRejected, match="weights file"):
        await provider.generate(spec(), handle(None))
    from providers.sandbox import build_lora_safetensors

    foreign = tmp_path / "sandbox.safetensors"  # a valid file whose shapes fit no tiny FLUX layer
    foreign.write_bytes(build_lora_safetensors(seed=0, ref="x", rank=4, meta={"format": "pt"}))
    with pytest.raises(ProviderError) as info:
        await provider.generate(spec(), handle(foreign))
    assert info.value.retryable  # another provider may take it
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ProviderError):
        await provider.generate(spec(), handle(garbage))
    assert provider.hosts[0].adapters == {} or all(p.exists() for p in provider.hosts[0].adapters.values())


def test_images_are_encoded_after_the_device_lock_is_released(hosts: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from providers.local import inference

    host = hosts[0]
    real = inference.encode_image
    held: list[bool] = []

    def spy(img: Any, output_format: str) -> bytes:
        held.append(host.lock.locked())
        return real(img, output_format)

    monkeypatch.setattr(inference, "encode_image", spy)
    req = inference.GenerateRequest(prompt="a photo of a person", width=32, height=32, seed=1, num_outputs=2,
                                    num_inference_steps=2, output_format="jpg")
    images = host.generate(req, None)
    assert held == [False, False]  # both images encoded, neither while the pipeline lock was held
    assert [Image.open(io.BytesIO(b)).format for b in images] == ["JPEG", "JPEG"]

"""Benchmark: FLUX.1-dev LoRA training throughput, peak memory and MFU of the ``local`` provider.

    python bench/local_gpu.py --model-dir /srv/models/FLUX.1-dev   # CUDA: 512 + 1024 px, every setting, whole job
    python bench/local_gpu.py --device cpu --tiny --steps 5 --warmup 1 --job-steps 20   # CPU smoke test
    python bench/local_gpu.py --resolutions 1024 --checkpointing on --switches none --steps 20 --json out.json
    python bench/local_gpu.py --switches compile fused_adamw --job-steps 0
    python bench/local_gpu.py --flops-only         # the FLOPs formula vs torch's counter (meta device, no GPU)

Settings, one run each with the same seed and the same initial LoRA: ``ckpt=off`` / ``ckpt=on``
(``--checkpointing``; ckpt=on is the provider's default config), then each speed switch of
``--switches`` on top of the default (``no-checkpointing``, ``compile`` with
``--compile-backend``, ``attention`` with ``--attention-backend``, ``lora_bf16``, ``sync_every``
with ``--sync-every``, ``fused_adamw``). Each row reports s/step, peak memory, MFU, and the loss of
the last step against the default's (same samples, so only the numerics differ). Then, unless
``--job-steps 0``, one whole job (default 1,000 steps at ``--job-resolution``) runs through the
real worker process (``python -m providers.local.worker``) on ``--model-dir`` (``--tiny``: a
tiny model is built) and ``--dataset`` (default: ``--job-images`` synthetic images), and its wall
time from process start to exit is reported with the worker's phases (encode, load, train,
checkpoints, save).

A full-size FLUX.1-dev transformer is built from its published config (hard-coded below: 19
double + 38 single blocks, 24 heads x 128, joint attention dim 4096, pooled 768, guidance
embeds, RoPE axes 16/56/56) with **random** weights -- the work per step is the same as with the
real weights, and nothing is downloaded. The LoRA (rank 16, alpha 16, on the provider's default
target modules: diffusers' FLUX set, attention + feed-forward of the double blocks, q/k/v of the
single blocks),
the loss and the optimiser step are the provider's own (``providers.local.trainer.add_lora`` and
``train_step``); text embeddings and latents are random tensors of the real shapes (T5: 512
tokens x 4096; CLIP pooled: 768; latents: 16 channels at 1/8 of the image side), as the
provider caches them before training.

For each resolution and gradient-checkpointing setting it runs ``--warmup`` steps, then times
``--steps`` steps (CUDA-synchronised) and reports steps/s, peak allocated GPU memory, and model
FLOPs utilisation (MFU) against the GPU's dense bf16 peak.

FLOPs are counted analytically (``step_flops``), per training step of batch ``b`` with ``Ti``
image tokens ((side/16)^2), ``Tt`` text tokens and ``T = Ti + Tt`` (D = 3072, r = rank):

* linear layers, forward: ``2 * sum over tokens of the weights each token passes through``.
  Per block that is 12*D^2 multiply-adds per token: a double block sends image tokens through
  the image weights (q, k, v, out: 4*D^2; MLP D->4D->D: 8*D^2) and text tokens through the text
  weights (the same sizes); a single block sends all T tokens through q, k, v (3*D^2), the MLP in
  (D->4D: 4*D^2) and the fused out projection (5D->D: 5*D^2). Plus the input embedders
  (64->D on image tokens, 4096->D on text tokens), the output projection (D->64 on image
  tokens), and what runs once per sample (AdaLN modulations, timestep/guidance/pooled embedders).
* attention, forward: ``4 * T^2 * D`` per block (QK^T and PV: 2*T^2*D multiply-adds), 57 blocks.
* LoRA, forward: ``2 * r * (in + out)`` per adapted layer per token (image tokens in the double
  blocks' to_q/k/v/out and ff, text tokens in their add_q/k/v_proj, to_add_out and ff_context,
  all tokens in the single blocks' to_q/k/v).
* backward: the base weights are frozen, so no weight gradients are computed for them, but
  activation gradients still flow back through every frozen linear layer that sits after the
  first LoRA: 1x its forward (so not the embedders, the per-sample layers, or block 0's q/k/v,
  whose inputs are constants). Attention backward is 2x its forward. LoRA backward: weight
  gradients of A and B plus input gradients, about 2x its forward.
* ``step = forward + backward``: about 4 * N_touched * T instead of the 6 * N * T of a full
  fine-tune. For FLUX.1-dev with 512 T5 tokens and the default targets at rank 16: 44.8 TFLOP at
  512 px (T = 1536), 164.1 TFLOP at 1024 px (T = 4608). ``--flops-only`` checks the formula against torch's FlopCounterMode on the
  meta device (exact match). Gradient checkpointing re-runs each block's forward during the
  backward; that recomputation is *not* in the model FLOPs (MFU) but is in HFU.

Peak dense bf16 tensor throughput (TFLOP/s): H100 SXM 989, H100 PCIe 756, H100 NVL 835, H200 SXM
989, H200 NVL 835, A100 312; others are flagged unknown (pass ``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from providers.local.config import DEFAULT_TARGET_MODULES  # noqa: E402 - plain msgspec, no torch

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
    os.environ[_k] = _v

#: FLUX.1-dev ``transformer/config.json``
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
#: a tiny config of the same shape, for ``--tiny`` smoke tests
TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
VAE_SCALE = 8  # FLUX's VAE: 8x downsampling, then 2x2 patches

#: dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, matched in order against
#: ``torch.cuda.get_device_name`` ("NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe",
#: "NVIDIA H100 NVL", "NVIDIA H200" is SXM, "NVIDIA H200 NVL"); whole words, so a GH200 is not an
#: H200 here. Anything else: unknown, pass ``--peak-tflops``.
PEAKS: list[tuple[str, float, str]] = [
    (r"\bH100\b.*\bNVL\b", 835.0, "H100 NVL"),
    (r"\bH100\b.*\bPCIE\b", 756.0, "H100 PCIe"),
    (r"\bH100\b", 989.0, "H100 SXM"),
    (r"\bH200\b.*\bNVL\b", 835.0, "H200 NVL"),
    (r"\bH200\b", 989.0, "H200 SXM"),
    (r"\bA100\b", 312.0, "A100"),
]


def peak_tflops(device_name: str) -> tuple[float | None, str]:
    name = device_name.upper()
    for pattern, peak, label in PEAKS:
        if re.search(pattern, name):
            return peak, label
    return None, "unknown"


# --------------------------------------------------------------------------- analytic FLOPs


@dataclass
class Flops:
    linear_fwd: float
    linear_bwd: float
    attention_fwd: float
    lora_fwd: float
    lora_bwd: float
    image_tokens: int
    text_tokens: int

    @property
    def forward(self) -> float:
        return self.linear_fwd + self.attention_fwd + self.lora_fwd

    @property
    def backward(self) -> float:
        return self.linear_bwd + 2 * self.attention_fwd + self.lora_bwd

    @property
    def step(self) -> float:
        """Model FLOPs of one training step (forward + backward, frozen base, no recompute)."""
        return self.forward + self.backward

    @property
    def recompute(self) -> float:
        """Extra FLOPs gradient checkpointing spends re-running block forwards (hardware, not model)."""
        return self.forward


def step_flops(cfg: dict[str, Any], resolution: int, text_tokens: int, rank: int, batch: int = 1,
               targets: tuple[str, ...] = DEFAULT_TARGET_MODULES) -> Flops:
    """Analytic FLOPs of one LoRA training step of the FLUX transformer ``cfg`` (see the module doc)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    m = 4 * d  # MLP hidden size (mlp_ratio 4)
    c, j, p = cfg["in_channels"], cfg["joint_attention_dim"], cfg["pooled_projection_dim"]
    n_double, n_single = cfg["num_layers"], cfg["num_single_layers"]
    ti = (resolution // (VAE_SCALE * 2)) ** 2
    tt = text_tokens
    t = ti + tt
    # multiply-adds per sample
    embed = ti * c * d + tt * j * d  # x_embedder, context_embedder: their inputs need no gradient
    blocks = (n_double * (ti + tt) * (4 * d * d + 2 * d * m)  # each stream through its own weights
              + n_single * t * (3 * d * d + d * m + (d + m) * d))  # q, k, v; proj_mlp; proj_out (5D -> D)
    head = ti * d * c  # proj_out
    per_sample = (  # timestep/guidance/text embedders (256->D->D, 256->D->D, P->D->D), AdaLN modulations
        2 * (256 * d + d * d) + (p * d + d * d)
        + n_double * 2 * d * 6 * d + n_single * d * 3 * d + d * 2 * d
    )
    # no gradient flows into the first block's q/k/v projections either (their input is still
    # constant: the first LoRA is in them), nor into anything per-sample
    first_qkv = 3 * (ti + tt) * d * d if n_double else 3 * t * d * d
    linear_fwd = 2.0 * batch * (embed + blocks + head + per_sample)
    linear_bwd = 2.0 * batch * (blocks - first_qkv + head)
    attention_fwd = 4.0 * batch * t * t * d * (n_double + n_single)
    lora_fwd_macs = 0.0  # per adapted layer: tokens x r x (in + out)
    lora_bwd_macs = 0.0  # weight grads r x (in + out), input grads r x out (+ r x in when the input needs one)
    # (tokens, blocks, in, out, input constant in the first block) of each target (suffix-matched names)
    shapes = {
        "to_q": [(ti, n_double, d, d, True), (t, n_single, d, d, not n_double)],
        "to_out.0": [(ti, n_double, d, d, False)],
        "add_q_proj": [(tt, n_double, d, d, True)],
        "to_add_out": [(tt, n_double, d, d, False)],
        "ff.net.0.proj": [(ti, n_double, d, m, False)],
        "ff.net.2": [(ti, n_double, m, d, False)],
        "ff_context.net.0.proj": [(tt, n_double, d, m, False)],
        "ff_context.net.2": [(tt, n_double, m, d, False)],
    }
    for alias, same in (("to_k", "to_q"), ("to_v", "to_q"), ("add_k_proj", "add_q_proj"), ("add_v_proj", "add_q_proj")):
        shapes[alias] = shapes[same]
    for name in targets:
        name = name.removeprefix("attn.")
        if name not in shapes:
            raise ValueError(f"target module {name!r} is not modelled by step_flops")
        for tokens, count, n_in, n_out, first_const in shapes[name]:
            if not count:
                continue
            lora_fwd_macs += count * tokens * rank * (n_in + n_out)
            lora_bwd_macs += count * tokens * rank * (2 * (n_in + n_out))
            if first_const:  # the first block's input needs no gradient
                lora_bwd_macs -= tokens * rank * n_in
    return Flops(linear_fwd, linear_bwd, attention_fwd, 2.0 * batch * lora_fwd_macs, 2.0 * batch * lora_bwd_macs,
                 ti, tt)


# --------------------------------------------------------------------------- the benchmark


@dataclass
class Row:
    resolution: int
    checkpointing: bool
    steps_per_s: float | None
    s_per_step: float | None
    peak_gib: float | None
    tflop_per_step: float
    tflops: float | None
    mfu: float | None
    hfu: float | None
    error: str | None = None
    setting: str = ""
    #: the loss of the last timed step (same seed, same samples in every setting)
    final_loss: float | None = None
    #: ``final_loss`` relative to the default setting's at this resolution
    loss_vs_default: float | None = None


#: the speed switches, each one run on top of the provider's default config (checkpointing on)
SWITCHES = ("no-checkpointing", "compile", "attention", "lora_bf16", "sync_every", "fused_adamw")


def switch_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields of setting ``name`` (``default``: the provider's defaults)."""
    return {
        "default": {"gradient_checkpointing": True},
        "ckpt=on": {"gradient_checkpointing": True},
        "ckpt=off": {"gradient_checkpointing": False},
        "no-checkpointing": {"gradient_checkpointing": False},
        "compile": {"gradient_checkpointing": True, "compile": True, "compile_backend": args.compile_backend},
        "attention": {"gradient_checkpointing": True, "attention_backend": args.attention_backend},
        "lora_bf16": {"gradient_checkpointing": True, "lora_bf16": True},
        "sync_every": {"gradient_checkpointing": True, "sync_every": args.sync_every},
        "fused_adamw": {"gradient_checkpointing": True, "fused_adamw": True},
    }[name]


def build_transformer(cfg: dict[str, Any], device: Any, dtype: Any) -> Any:
    import torch
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # create the weights directly in bf16 on the device (no 48 GB fp32 copy)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device)


def synthetic_encoded(cfg: dict[str, Any], resolution: int, text_tokens: int, device: Any, dtype: Any,
                      count: int = 4) -> Any:
    """Cached latents and text embeddings of the real shapes, as ``encode_dataset`` makes them."""
    import torch
    from diffusers import FluxPipeline

    from providers.local.trainer import Encoded

    g = torch.Generator().manual_seed(0)
    ch = cfg["in_channels"] // 4
    side = resolution // VAE_SCALE
    return Encoded(
        latent_mean=torch.randn(count, ch, side, side, generator=g).to(device),
        latent_std=torch.full((count, ch, side, side), 0.05).to(device),
        prompt_embeds=torch.randn(count, text_tokens, cfg["joint_attention_dim"], generator=g).to(device, dtype),
        pooled_embeds=torch.randn(count, cfg["pooled_projection_dim"], generator=g).to(device, dtype),
        text_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype),
        img_ids=FluxPipeline._prepare_latent_image_ids(count, side // 2, side // 2, device, dtype),
        shift_factor=0.1159, scaling_factor=0.3611,
    )


def run_one(transformer: Any, cfg: dict[str, Any], args: argparse.Namespace, resolution: int, checkpointing: bool,
            device: Any, dtype: Any, peak: float | None, setting: str | None = None,
            initial_lora: dict | None = None) -> Row:
    """Time ``args.steps`` steps (after ``args.warmup``) of ``setting`` (default: plain, with or
    without ``checkpointing``). The LoRA starts from ``initial_lora`` and speed switches that
    change the transformer (compile, attention backend) are undone afterwards."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from providers.local import trainer
    from providers.local.config import TrainConfig

    setting = setting or ("ckpt=on" if checkpointing else "ckpt=off")
    fields = switch_config(setting, args)
    checkpointing = bool(fields.get("gradient_checkpointing", checkpointing))
    flops = step_flops(cfg, resolution, args.text_tokens, args.rank, args.batch)
    tcfg = TrainConfig(steps=args.warmup + args.steps, rank=args.rank, resolution=resolution, batch_size=args.batch,
                       guidance_scale=1.0, max_sequence_length=args.text_tokens, seed=args.seed,
                       **{**fields, "gradient_checkpointing": checkpointing})
    if initial_lora is not None:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(transformer, {k: v.to(device) for k, v in initial_lora.items()}, adapter_name="default")
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    row = Row(resolution, checkpointing, None, None, None, flops.step / 1e12, None, None, None, setting=setting)
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    try:
        if tcfg.attention_backend:
            trainer.set_attention_backend(transformer, tcfg.attention_backend)
        if tcfg.compile:
            trainer.compile_blocks(transformer, tcfg)
    except trainer.TrainConfigError as e:
        row.error = str(e)[:120]
        return row
    optimizer = trainer.make_optimizer(transformer, tcfg, log=lambda m: print("  " + m))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    enc = synthetic_encoded(cfg, resolution, args.text_tokens, device, dtype)
    cuda = device.type == "cuda"
    deferred = tcfg.sync_every > 1
    tables = trainer.device_tables(scheduler, device) if deferred else scheduler
    autocast = trainer.lora_autocast(tcfg, device, dtype)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def step(n: int) -> Any:
        return trainer.train_step_tensor(transformer, enc, n, tcfg, tables, optimizer, params,
                                         check_finite=not deferred, on_device=deferred, autocast=autocast)

    losses: list[Any] = []
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for n in range(args.warmup):
            step(n)
        sync()
        t0 = time.perf_counter()
        for n in range(args.warmup, args.warmup + args.steps):
            losses.append(step(n))
            if deferred and len(losses) % tcfg.sync_every == 0:
                float(losses[-1])  # the host read sync_every allows
        sync()
        elapsed = time.perf_counter() - t0
    except torch.cuda.OutOfMemoryError:
        row.error = "out of memory"
        return row
    finally:
        optimizer.zero_grad(set_to_none=True)
        for block in blocks:  # undo the switches that change the transformer
            block._compiled_call_impl = None
        if tcfg.attention_backend:  # per module and diffusers' process-wide active backend
            transformer.set_attention_backend("native")
        if cuda:
            torch.cuda.empty_cache()
    row.final_loss = float(losses[-1]) if losses else None
    row.s_per_step = elapsed / args.steps
    row.steps_per_s = 1.0 / row.s_per_step
    row.tflops = flops.step / row.s_per_step / 1e12
    if cuda:
        row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    if peak:
        row.mfu = row.tflops / peak
        hw = (flops.step + (flops.recompute if checkpointing else 0.0)) / row.s_per_step / 1e12
        row.hfu = hw / peak
    return row


def whole_job(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """Wall time of one job as the provider runs it: ``python -m providers.local.worker JOB_DIR``
    from process start to exit (imports, encoding, model load, steps, checkpoints, save), with the
    phases the worker reports in ``result.json``."""
    import msgspec

    from providers.local.config import LocalConfig
    from providers.local.provider import train_config

    root = Path(tempfile.mkdtemp(prefix="bench-job-"))
    model_dir = Path(args.model_dir) if args.model_dir else None
    if model_dir is None:
        if not args.tiny:
            return {"error": "no --model-dir (a diffusers FLUX.1-dev directory): whole-job timing skipped"}
        from tests.tiny_flux import build_tiny_flux

        model_dir = build_tiny_flux(root / "model")
    if args.dataset:
        dataset = Path(args.dataset)
    else:
        from tests.images import make_image

        dataset = root / "dataset"
        dataset.mkdir()
        for i in range(1, args.job_images + 1):
            (dataset / f"{i:03d}.jpg").write_bytes(make_image(seed=i, size=(args.job_resolution * 5 // 4,) * 2))
            (dataset / f"{i:03d}.txt").write_text("a photo of K7XQZ, a person smiling in the garden")
    local = LocalConfig(model_dir=str(model_dir), resolution=args.job_resolution, devices=[str(device)],
                        max_sequence_length=args.text_tokens)
    spec_steps = type("Spec", (), {"steps": args.job_steps, "lora_rank": args.rank})()
    cfg = train_config(local, spec_steps)  # the provider's own mapping: request steps/rank -> TrainConfig
    job = root / "job"
    job.mkdir()
    (job / "train.json").write_text(json.dumps({"model_dir": str(model_dir), "dataset_dir": str(dataset),
                                                "config": msgspec.to_builtins(cfg)}))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "providers.local.worker", str(job), "--device", str(device)],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    result = json.loads((job / "result.json").read_text()) if (job / "result.json").is_file() else {}
    out = {"steps": cfg.steps, "resolution": cfg.resolution, "images": len(list(dataset.glob("*.jpg"))),
           "wall_s": wall, "exit": proc.returncode, "state": result.get("state"), "timings": result.get("timings", {}),
           "error": result.get("error") or (proc.stderr[-500:] if proc.returncode else None)}
    return out


def counted_flops(transformer: Any, cfg: dict[str, Any], args: argparse.Namespace, resolution: int, device: Any,
                  dtype: Any) -> dict[str, float]:
    """One step's FLOPs as torch's FlopCounterMode counts them, forward and backward, to cross-check
    ``step_flops`` (checkpointing off). It knows the CUDA flash / memory-efficient attention kernels;
    on CPU the math attention backend is used, whose matmuls it counts."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from torch.utils.flop_counter import FlopCounterMode

    from providers.local import trainer
    from providers.local.config import TrainConfig

    transformer.disable_gradient_checkpointing()
    tcfg = TrainConfig(steps=1, rank=args.rank, resolution=resolution, batch_size=args.batch,
                       max_sequence_length=args.text_tokens)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    enc = synthetic_encoded(cfg, resolution, args.text_tokens, device, dtype)
    idx, x0, noise, indices = trainer.sample_step(enc, 0, tcfg, 1000)
    kernel = contextlib.nullcontext()
    if device.type != "cuda":  # the math attention is plain matmuls, which the counter sees
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel(SDPBackend.MATH)
    with kernel:
        with FlopCounterMode(display=False) as fwd:
            loss = trainer.flow_matching_loss(transformer, enc, idx, x0, noise, indices, scheduler, 1.0)
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
    transformer.zero_grad(set_to_none=True)
    out: dict[str, float] = {}
    for phase, counter in (("fwd", fwd), ("bwd", bwd)):
        for op, n in counter.get_flop_counts().get("Global", {}).items():
            kind = "attention" if "attention" in str(op) else "matmul"
            out[f"{kind}_{phase}"] = out.get(f"{kind}_{phase}", 0.0) + float(n)
    return out


def meta_flops_check(cfg: dict[str, Any], args: argparse.Namespace) -> list[tuple[int, Flops, float, float]]:
    """Count one step of the real-size model on the ``meta`` device (shapes only: no memory, no
    GPU) with FlopCounterMode and the math attention; returns (px, analytic, fwd, bwd) per size."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from providers.local import trainer
    from providers.local.config import TrainConfig

    meta, dtype = torch.device("meta"), torch.bfloat16
    transformer = build_transformer(cfg, meta, dtype)
    trainer.add_lora(transformer, TrainConfig(steps=1, rank=args.rank))
    out = []
    for res in args.resolutions:
        ti = (res // (VAE_SCALE * 2)) ** 2
        b, tt = args.batch, args.text_tokens
        kw = dict(hidden_states=torch.empty(b, ti, cfg["in_channels"], device=meta, dtype=dtype),
                  timestep=torch.empty(b, device=meta, dtype=dtype),
                  guidance=torch.empty(b, device=meta) if cfg["guidance_embeds"] else None,
                  pooled_projections=torch.empty(b, cfg["pooled_projection_dim"], device=meta, dtype=dtype),
                  encoder_hidden_states=torch.empty(b, tt, cfg["joint_attention_dim"], device=meta, dtype=dtype),
                  txt_ids=torch.zeros(tt, 3, device=meta), img_ids=torch.zeros(ti, 3, device=meta), return_dict=False)
        with sdpa_kernel(SDPBackend.MATH):
            with FlopCounterMode(display=False) as fwd:
                pred = transformer(**kw)[0]
            loss = pred.float().pow(2).mean()
            with FlopCounterMode(display=False) as bwd:
                loss.backward()
        transformer.zero_grad(set_to_none=True)
        est = step_flops(cfg, res, tt, args.rank, b)
        out.append((res, est, float(fwd.get_total_flops()), float(bwd.get_total_flops())))
    return out


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[list[str]], header: list[str]) -> str:
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny transformer (smoke test, e.g. on CPU)")
    ap.add_argument("--resolutions", type=int, nargs="+", default=None, help="default 512 1024 (tiny: 32 64)")
    ap.add_argument("--checkpointing", choices=("both", "on", "off"), default="both")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--text-tokens", type=int, default=None, help="T5 tokens (default 512; tiny: 16)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak, if not in the table")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--flops-only", action="store_true",
                    help="only check the FLOPs formula against torch's counter on the meta device (no GPU needed)")
    ap.add_argument("--check-flops", action="store_true",
                    help="compare the analytic FLOPs with torch's FlopCounterMode on one step first")
    ap.add_argument("--switches", nargs="+", default=["all"], choices=("all", "none", *SWITCHES),
                    help="speed switches to time, one run each on top of the default config (checkpointing on)")
    ap.add_argument("--seed", type=int, default=0, help="the same seed for every setting (comparable losses)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; CPU: aot_eager)")
    ap.add_argument("--attention-backend", default=None,
                    help="diffusers attention backend for the 'attention' switch (default _native_cudnn; CPU: _native_math)")
    ap.add_argument("--sync-every", type=int, default=10, help="N of the sync_every switch")
    ap.add_argument("--job-steps", type=int, default=1000,
                    help="also time a whole job of this many steps through the worker process (0: skip)")
    ap.add_argument("--job-resolution", type=int, default=None, help="its resolution (default 512; tiny: 32)")
    ap.add_argument("--job-images", type=int, default=10, help="its synthetic dataset size (without --dataset)")
    ap.add_argument("--model-dir", default=None, help="a diffusers FLUX directory for the whole-job run (tiny: built)")
    ap.add_argument("--dataset", default=None, help="NNN.jpg + NNN.txt files for the whole-job run (default synthetic)")
    args = ap.parse_args(argv)

    import torch

    from providers.local import trainer
    from providers.local.config import TrainConfig

    trainer.quiet_libraries()
    cfg = TINY if args.tiny else FLUX_DEV
    args.resolutions = args.resolutions or ([32, 64] if args.tiny else [512, 1024])
    args.text_tokens = args.text_tokens or (16 if args.tiny else 512)
    for r in args.resolutions:
        if r % 16:
            ap.error(f"resolution {r} is not a multiple of 16")
    if args.flops_only:
        print(f"FLOPs of one training step, {'tiny' if args.tiny else 'FLUX.1-dev'} config, rank {args.rank}, "
              f"batch {args.batch}, {args.text_tokens} text tokens: analytic vs FlopCounterMode on the meta device")
        rows = [[str(res), f"{est.image_tokens + est.text_tokens}", f"{est.forward / 1e12:.4f}", f"{fwd / 1e12:.4f}",
                 f"{est.backward / 1e12:.4f}", f"{bwd / 1e12:.4f}", f"{est.step / 1e12:.4f}",
                 "ok" if abs(fwd + bwd - est.step) <= 1e-6 * est.step else "MISMATCH"]
                for res, est, fwd, bwd in meta_flops_check(cfg, args)]
        print(table(rows, ["px", "tokens", "fwd TF", "counted", "bwd TF", "counted", "step TF", "check"]))
        return 0 if all(r[-1] == "ok" for r in rows) else 1

    device = torch.device(args.device)
    args.compile_backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    args.attention_backend = args.attention_backend or ("_native_cudnn" if device.type == "cuda" else "_native_math")
    args.job_resolution = args.job_resolution or (32 if args.tiny else 512)
    switches = [] if "none" in args.switches else list(SWITCHES) if "all" in args.switches else args.switches
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu --tiny for a smoke test", file=sys.stderr)
        return 2
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak, label = (args.peak_tflops, "given") if args.peak_tflops else peak_tflops(name)
    else:
        name, peak, label = f"cpu ({torch.get_num_threads()} threads)", args.peak_tflops, "given" if args.peak_tflops else "unknown"
    print(f"device: {name}; bf16 dense peak: {fmt(peak, '.0f')} TFLOP/s ({label})")
    if peak is None:
        print("WARNING: unknown peak for this device: MFU is not reported; pass its dense bf16 peak with "
              "--peak-tflops (known: " + ", ".join(f"{label} {p:.0f}" for _, p, label in PEAKS) + ")")
    print(f"torch {torch.__version__}; dtype {dtype}; config {'tiny' if args.tiny else 'FLUX.1-dev'}; "
          f"rank {args.rank}; batch {args.batch}; text tokens {args.text_tokens}")

    t0 = time.perf_counter()
    transformer = build_transformer(cfg, device, dtype)
    n_params = sum(p.numel() for p in transformer.parameters())
    trainer.add_lora(transformer, TrainConfig(steps=1, rank=args.rank, seed=args.seed))
    # every setting starts from this LoRA (cloned: on a float32 CPU run ``.to`` would alias the parameters)
    initial_lora = {k: v.clone() for k, v in trainer.lora_state_dict(transformer).items()}
    n_lora = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    print(f"transformer: {n_params / 1e9:.3f} B params (random weights), LoRA {n_lora / 1e6:.2f} M params; "
          f"built in {time.perf_counter() - t0:.1f}s")

    if args.check_flops:
        res = args.resolutions[0]
        est = step_flops(cfg, res, args.text_tokens, args.rank, args.batch)
        got = counted_flops(transformer, cfg, args, res, device, dtype)
        pairs = [("forward", est.forward, got.get("matmul_fwd", 0.0) + got.get("attention_fwd", 0.0)),
                 ("backward", est.backward, got.get("matmul_bwd", 0.0) + got.get("attention_bwd", 0.0))]
        print(f"FLOPs check at {res}px (analytic vs torch FlopCounterMode, checkpointing off):")
        for what, a, c in pairs:
            print(f"  {what:9s} {a:.5g} vs {c:.5g}  ({c / a:.4f}x)")

    modes = {"both": [False, True], "on": [True], "off": [False]}[args.checkpointing]
    settings = [("ckpt=on" if m else "ckpt=off") for m in modes] + [s for s in switches if s != "no-checkpointing"
                                                                    or "ckpt=off" not in [f"ckpt={'on' if m else 'off'}"
                                                                                          for m in modes]]
    rows = []
    for res in args.resolutions:
        for setting in settings:
            row = run_one(transformer, cfg, args, res, setting == "ckpt=on", device, dtype, peak, setting=setting,
                          initial_lora=initial_lora)
            rows.append(row)
            print(f"  {res}px {setting}: {fmt(row.steps_per_s, '.3f')} steps/s, {fmt(row.s_per_step, '.3f')} s/step, "
                  f"peak {fmt(row.peak_gib, '.1f')} GiB, loss {fmt(row.final_loss, '.5f')}"
                  + (f" ({row.error})" if row.error else ""), flush=True)
        base = next((r for r in rows if r.resolution == res and r.setting == "ckpt=on" and r.final_loss), None) or next(
            (r for r in rows if r.resolution == res and r.final_loss), None)
        for r in rows:
            if r.resolution == res and base is not None and r.final_loss is not None:
                r.loss_vs_default = r.final_loss / base.final_loss - 1.0

    print()
    print(table([[str(r.resolution), r.setting, "on" if r.checkpointing else "off", fmt(r.steps_per_s, ".3f"),
                  fmt(r.s_per_step, ".3f"), fmt(r.peak_gib, ".1f"), f"{r.tflop_per_step:.3g}",
                  fmt(r.tflops, ".3g"), fmt(r.mfu and 100 * r.mfu, ".3g"), fmt(r.hfu and 100 * r.hfu, ".3g"),
                  fmt(r.final_loss, ".5f"), fmt(r.loss_vs_default and 100 * r.loss_vs_default, "+.3f"),
                  r.error or ""] for r in rows],
                ["px", "setting", "ckpt", "steps/s", "s/step", "peak GiB", "TFLOP/step", "TFLOP/s", "MFU %", "HFU %",
                 f"loss@{args.warmup + args.steps}", "vs default %", "note"]))
    print("\nTFLOP/step: analytic model FLOPs of forward + backward with a frozen base (see the module doc);"
          " MFU leaves out, HFU counts, the forward that gradient checkpointing recomputes. Every setting starts"
          " from the same LoRA and seed; 'vs default' compares the last step's loss with the ckpt=on run's.")
    job = None
    if args.job_steps:
        del transformer
        trainer.free_memory()
        job = whole_job(args, device)
        print(f"\nwhole job through the worker process ({job.get('steps')} steps at {job.get('resolution')} px, "
              f"{job.get('images')} images): " + (f"{job['wall_s']:.1f} s wall, exit {job['exit']}, {job['state']}; "
                                                  + ", ".join(f"{k} {v:.1f}s" for k, v in job["timings"].items())
                                                  + f"; process start, imports, exit: "
                                                    f"{job['wall_s'] - sum(job['timings'].values()):.1f}s"
                                                  if "wall_s" in job else job["error"]))
        if job.get("exit"):
            print(job.get("error"))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "peak_tflops": peak, "dtype": str(dtype),
                                         "config": "tiny" if args.tiny else "FLUX.1-dev", "rank": args.rank,
                                         "batch": args.batch, "text_tokens": args.text_tokens,
                                         "params": n_params, "lora_params": n_lora,
                                         "rows": [asdict(r) for r in rows], "job": job}, indent=2))
    return 0 if all(r.error is None for r in rows) and not (job or {}).get("exit") else 1


if __name__ == "__main__":
    sys.exit(main())

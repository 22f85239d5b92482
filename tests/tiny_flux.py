"""A tiny, randomly initialised FLUX pipeline built in the test session (no download, no hub).

:func:`build_tiny_flux` writes a complete diffusers ``FluxPipeline`` directory (transformer with
one double and one single block, a 4-level VAE, tiny CLIP and T5 text encoders, and tokenizers
made in memory from a fixed hand-written vocabulary) through ``save_pretrained``, so that the
code under test loads it through the real ``FluxPipeline.from_pretrained(dir)`` path.

Sizes: the VAE downsamples 8x (``block_out_channels`` of length 4) and FLUX packs 2x2 latent
patches, so image sides must be multiples of 16. ``latent_channels=4`` gives the transformer
``in_channels=16``. Everything is seeded, so the weights are the same in every run.

Import torch lazily: this module is imported by test files that must skip without torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: the hand-made vocabulary of both tokenizers (lower-cased words; anything else is <unk>)
WORDS = (
    "a photo of portrait in the garden on beach with sunset smiling person woman man style "
    "object red blue green light dark close up studio painting city street at night"
).split()
CLIP_MAX_LENGTH = 16
T5_MAX_LENGTH = 16
HIDDEN = 32  # text hidden size == joint_attention_dim == pooled_projection_dim

_BUILT: dict[str, Path] = {}


def _clip_tokenizer() -> Any:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<|startoftext|>", "<|endoftext|>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(WORDS))}
    tk = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        unk_token="<unk>", pad_token="<|endoftext|>", model_max_length=CLIP_MAX_LENGTH,
    )


def _t5_tokenizer() -> Any:
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(WORDS))}
    tk = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=T5_MAX_LENGTH,
    )


def tiny_transformer_config(guidance_embeds: bool = True) -> dict[str, Any]:
    return dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=HIDDEN, pooled_projection_dim=HIDDEN,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )


def build_tiny_flux(root: Path, *, guidance_embeds: bool = True, seed: int = 0) -> Path:
    """Write a tiny random FLUX pipeline under ``root`` and return the directory."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**tiny_transformer_config(guidance_embeds))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=1.5035, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
    )
    tok = _clip_tokenizer()
    tok2 = _t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=HIDDEN,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tok2), d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1, feed_forward_proj="gated-gelu", dropout_rate=0.0,
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
        tokenizer_2=tok2, transformer=transformer,
    )
    out = Path(root)
    pipe.save_pretrained(out)
    return out


def tiny_flux_dir_for(factory: pytest.TempPathFactory, guidance_embeds: bool = True) -> Path:
    """One tiny model per session and variant, however many test modules ask for it."""
    key = f"flux-g{int(guidance_embeds)}"
    if key not in _BUILT:
        _BUILT[key] = build_tiny_flux(factory.mktemp(key), guidance_embeds=guidance_embeds)
    return _BUILT[key]


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny FLUX directory (guidance embeds on, as in FLUX.1-dev)."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    return tiny_flux_dir_for(tmp_path_factory, guidance_embeds=True)


# --------------------------------------------------------------------------- datasets, LoRAs

TRIGGER = "K7XQZ"
#: tiny run settings: 32 px images, short prompts, a high learning rate so a few steps show
TINY_TRAIN = dict(resolution=32, rank=8, learning_rate=1e-2, max_sequence_length=T5_MAX_LENGTH,
                  checkpoint_every=2, seed=0)


def write_dataset(directory: Path, n: int = 3, word: str = TRIGGER) -> Path:
    """``NNN.jpg`` + ``NNN.txt`` as the gateway's dataset preparation writes them."""
    from tests.images import make_image

    directory.mkdir(parents=True, exist_ok=True)
    for i in range(1, n + 1):
        (directory / f"{i:03d}.jpg").write_bytes(make_image(seed=i, size=(80, 64)))
        (directory / f"{i:03d}.txt").write_text(f"a photo of {word}, a person smiling in the garden", "utf-8")
    return directory


def tiny_train_config(**overrides: Any) -> Any:
    from providers.local.config import TrainConfig

    return TrainConfig(**{"steps": 20, **TINY_TRAIN, **overrides})


def trained_lora_for(factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """A LoRA trained in-process on the tiny model (30 steps), once per session."""
    key = f"lora:{model_dir}"
    if key not in _BUILT:
        from providers.local import trainer

        root = factory.mktemp("tiny-lora")
        data = write_dataset(root / "dataset")
        result = trainer.train(model_dir, data, tiny_train_config(steps=30), root / "out")
        _BUILT[key] = result.weights
    return _BUILT[key]


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory: pytest.TempPathFactory, tiny_flux: Path) -> Path:
    """``pytorch_lora_weights.safetensors`` trained on ``tiny_flux``."""
    return trained_lora_for(tmp_path_factory, tiny_flux)


def make_local_provider(data_dir: Path, model_dir: Path, **config: Any) -> Any:
    """A ``LocalProvider`` over ``data_dir`` as the gateway builds it (call again = a restart)."""
    from plugins.storage.local import LocalStorage, LocalStorageConfig
    from providers.base import ProviderSetup
    from providers.local import LocalConfig, LocalProvider

    setup = ProviderSetup(storage=LocalStorage(LocalStorageConfig(), data_dir), data_dir=data_dir,
                          public_base_url=None, http_client=lambda **kw: None)
    base: dict[str, Any] = {"model_dir": str(model_dir), "resolution": 32, "max_sequence_length": T5_MAX_LENGTH,
                            "learning_rate": 1e-2, "devices": ["cpu"]}
    return LocalProvider(LocalConfig(**{**base, **config}), setup)

"""Tiny, randomly initialised pipelines for offline tests and demos (``MODEL=tiny``, ``tiny-sd``, ``tiny-sdxl``).

``tiny`` is Z-Image; ``tiny-sd`` and ``tiny-sdxl`` are Stable Diffusion and SDXL with a few
thousand weights, built like diffusers' own ``get_dummy_components()`` but entirely in memory
(the CLIP tokenizer too), so nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

_log = logging.getLogger(__name__)

#: written next to ``model_index.json`` so a saved tiny build is recognised as the ``tiny`` preset
MARKER_FILE = "brushbot_tiny.json"

# Qwen-style chat template, cut down to what ZImagePipeline sends (one user turn plus the
# generation prompt); ``enable_thinking`` is accepted like Qwen3's own template.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
    "{%- endif %}"
)
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table: 256 printable stand-ins, one per byte value.

    With every byte in the vocabulary, any text (Chinese, emoji, ...) tokenizes without
    an unknown token, and no merges are needed.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


#: ``Qwen3Config`` of the tiny text encoder, less what the tokenizer decides (vocabulary size, pad token)
TEXT_ENCODER_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "max_position_embeddings": 1024,
    }
)
#: ``ZImageTransformer2DModel`` arguments of the tiny transformer
TRANSFORMER_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "all_patch_size": (2,),
        "all_f_patch_size": (1,),
        "in_channels": 16,
        "dim": 32,
        "n_layers": 2,
        "n_refiner_layers": 1,
        "n_heads": 2,
        "n_kv_heads": 2,
        "cap_feat_dim": 16,  # the text encoder's hidden size
        "axes_dims": [8, 4, 4],  # sums to the head dim (32 / 2)
        # caption positions (up to the 512-token prompt) and image patches up to 512 px
        "axes_lens": [1024, 32, 32],
    }
)
#: ``AutoencoderKL`` arguments of the tiny VAE
VAE_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        # four blocks like FLUX's VAE: an 8x downscale, so sizes are multiples of 16 after patching
        "block_out_channels": [8, 8, 16, 16],
        "layers_per_block": 1,
        "latent_channels": 16,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }
)


def build_tokenizer() -> Any:
    """The byte-level ``Qwen2Tokenizer`` of the tiny pipeline, built in memory (any text, no download)."""
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(_byte_level_alphabet())}
    for token in _SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=1024)
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def build_components(
    tokenizer: Any,
    *,
    text_encoder: Mapping[str, Any] = TEXT_ENCODER_CONFIG,
    transformer: Mapping[str, Any] = TRANSFORMER_CONFIG,
    vae: Mapping[str, Any] = VAE_CONFIG,
) -> tuple[Any, Any, Any]:
    """(text encoder, transformer, VAE) with random weights from fixed seeds (0, 1 and 2).

    ``text_encoder`` takes its vocabulary size from ``tokenizer`` unless it names one. The
    modules are built on torch's current default device (``with torch.device(...)``); the
    global torch RNG state of the CPU is left as it was.
    """
    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = Qwen3Config(
            **{"vocab_size": len(tokenizer), **copy.deepcopy(dict(text_encoder))},
            pad_token_id=tokenizer.pad_token_id,
        )
        encoder: Any = Qwen3Model(config)
        torch.manual_seed(1)
        denoiser: Any = ZImageTransformer2DModel(**copy.deepcopy(dict(transformer)))
        with torch.no_grad():
            # allocated with torch.empty: pin them so builds are identical and free of NaNs
            denoiser.x_pad_token.fill_(1.0)
            denoiser.cap_pad_token.fill_(1.0)
        torch.manual_seed(2)
        decoder: Any = AutoencoderKL(**copy.deepcopy(dict(vae)))
    return encoder, denoiser, decoder


def build_tiny_pipeline(out_dir: str | Path) -> Path:
    """Build the tiny pipeline and save it as a diffusers folder at ``out_dir``; return the folder.

    Same component classes as Z-Image-Turbo (Qwen3Model, Qwen2Tokenizer, ZImageTransformer2DModel,
    a 16-channel AutoencoderKL, FlowMatchEulerDiscreteScheduler(shift=3.0)), with a few thousand
    weights each. The weights come from fixed seeds, so two builds are identical; the global torch
    RNG state is left as it was. The folder appears whole or not at all (built beside it, then renamed).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    started = time.perf_counter()
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    text_encoder, transformer, vae = build_components(tokenizer)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe: Any = ZImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )

    _save(pipe, out, "tiny")
    _log.info("built the tiny pipeline in %s (%.2f s)", out, time.perf_counter() - started)
    return out


def _save(pipe: Any, out: Path, preset: str) -> None:
    """Save ``pipe`` at ``out`` with the marker naming its preset; whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / MARKER_FILE).write_text(json.dumps({"preset": preset, "version": 1}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def marker_preset(folder: Path) -> str | None:
    """The preset a saved tiny build is (``tiny``, ``tiny-sd``, ``tiny-sdxl``), or None if it is none."""
    try:
        data = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "tiny"  # an unreadable marker: the first builds wrote only Z-Image ones
    preset = data.get("preset") if isinstance(data, dict) else None
    return preset if isinstance(preset, str) and preset in TINY_BUILDERS else "tiny"


# ---- Stable Diffusion and SDXL ----------------------------------------------------------------

_CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")

#: ``CLIPTextConfig`` of the tiny text encoders, less the vocabulary and token ids
CLIP_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "projection_dim": 16,
        "max_position_embeddings": 77,
    }
)
#: the SD VAE: four blocks (an 8x downscale, like the real one) with 4 latent channels
SD_VAE_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        **{k: v for k, v in VAE_CONFIG.items() if k not in ("scaling_factor", "shift_factor")},
        "latent_channels": 4,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }
)
_UNET_BASE: Mapping[str, Any] = MappingProxyType(
    {
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
    }
)
#: SD's UNet: cross-attention on the one text encoder's hidden states
SD_UNET_CONFIG: Mapping[str, Any] = MappingProxyType(
    {**_UNET_BASE, "cross_attention_dim": 16, "attention_head_dim": 4}
)
#: SDXL's UNet: both encoders' hidden states (16 + 16), and the pooled text and size embedding
SDXL_UNET_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        **_UNET_BASE,
        "cross_attention_dim": 32,
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "transformer_layers_per_block": (1, 1),
        # 6 size/crop numbers x 8 + the pooled projection of the second encoder (16)
        "projection_class_embeddings_input_dim": 6 * 8 + 16,
    }
)


def build_clip_tokenizer() -> Any:
    """A byte-level ``CLIPTokenizer`` built in memory: every byte and byte + ``</w>``, no merges."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for ch in _byte_level_alphabet():
            vocab[ch + suffix] = len(vocab)
    for token in _CLIP_SPECIAL:
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _sd_pipeline(xl: bool) -> Any:
    """A tiny SD or SDXL pipeline with weights from fixed seeds; the torch RNG state is left as it was."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_clip_tokenizer()
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in _CLIP_SPECIAL)
    config = CLIPTextConfig(
        **copy.deepcopy(dict(CLIP_CONFIG)),
        vocab_size=len(tokenizer),
        bos_token_id=start,
        eos_token_id=end,
        pad_token_id=end,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text_encoder: Any = CLIPTextModel(config)
        torch.manual_seed(1)
        unet: Any = UNet2DConditionModel(**copy.deepcopy(dict(SDXL_UNET_CONFIG if xl else SD_UNET_CONFIG)))
        torch.manual_seed(2)
        vae: Any = AutoencoderKL(**copy.deepcopy(dict(SD_VAE_CONFIG)))
        if not xl:
            return StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        torch.manual_seed(3)
        text_encoder_2: Any = CLIPTextModelWithProjection(config)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )


def build_tiny_sd_pipeline(out_dir: str | Path) -> Path:
    """Build the tiny Stable Diffusion pipeline (``tiny-sd``) and save it at ``out_dir``."""
    out = Path(out_dir)
    _save(_sd_pipeline(xl=False), out, "tiny-sd")
    return out


def build_tiny_sdxl_pipeline(out_dir: str | Path) -> Path:
    """Build the tiny SDXL pipeline (``tiny-sdxl``) and save it at ``out_dir``."""
    out = Path(out_dir)
    _save(_sd_pipeline(xl=True), out, "tiny-sdxl")
    return out


#: the builder of each tiny preset
TINY_BUILDERS: Mapping[str, Callable[[str | Path], Path]] = MappingProxyType(
    {
        "tiny": build_tiny_pipeline,
        "tiny-sd": build_tiny_sd_pipeline,
        "tiny-sdxl": build_tiny_sdxl_pipeline,
    }
)

"""A tiny, randomly initialised Z-Image pipeline for offline tests and demos (``MODEL=tiny``)."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
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

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / MARKER_FILE).write_text(json.dumps({"preset": "tiny", "version": 1}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _log.info("built the tiny pipeline in %s (%.2f s)", out, time.perf_counter() - started)
    return out

"""Speed settings: the memory tier QUANTIZE=auto picks per card, attention backends, compilation and warm sizes.

The tier choice and the backend choices are pure functions, tested for the cards an operator
has; int8 weights, the native attention backend and regional compilation also draw with the
tiny Z-Image on the CPU through the real loading path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from bot.config import Attention, Offload, Quantize, Settings, load_settings
from bot.domain import DrawRequest
from bot.errors import BotError, ConfigError
from generation import acceleration
from generation.acceleration import choose_attention, warm_sizes
from generation.loading import LoadPlan, decide_plan, load_pipeline
from generation.precision import available_quantizers, choose_tier, unavailable_reason
from generation.presets import PRESETS, resolve_profile
from generation.worker import Worker, call_pipeline

GIB = 1024**3
Z_IMAGE = PRESETS["z-image-turbo"]
HOPPER, ADA, AMPERE = (9, 0), (8, 9), (8, 6)
EVERYTHING = frozenset({"torchao", "bitsandbytes"})


def free_on(card_gb: int) -> int:
    """What a card of ``card_gb`` GB has free once the CUDA context is up (about 0.6 GiB less)."""
    return int(card_gb * 1e9 - 0.6 * GIB)


def tier(
    card_gb: int, capability: tuple[int, int] = ADA, installed: frozenset[str] = EVERYTHING, **kw: Any
) -> Any:
    return choose_tier(
        kw.pop("quantize", Quantize.AUTO),
        kw.pop("offload", Offload.AUTO),
        free_bytes=free_on(card_gb),
        weights_bytes=Z_IMAGE.weights_bytes,
        largest_share=Z_IMAGE.largest_share,
        available=available_quantizers(cuda=True, capability=capability, installed=installed),
    )


@pytest.mark.parametrize(
    ("card_gb", "capability", "quantize", "offload"),
    [
        (141, HOPPER, Quantize.NONE, Offload.NONE),  # H200: bf16, everything on the card
        (80, HOPPER, Quantize.NONE, Offload.NONE),  # H100 / A100 80 GB
        (24, ADA, Quantize.FP8, Offload.NONE),  # 20.5 GB × 1.2 does not fit: fp8 does
        (24, AMPERE, Quantize.INT8, Offload.NONE),  # a 3090 has no fp8 matmuls: int8
        (16, ADA, Quantize.FP8, Offload.NONE),  # a 16 GB card: 8-bit without offload
        (12, AMPERE, Quantize.INT8, Offload.MODEL),  # 8-bit, one component at a time
        (8, ADA, Quantize.NF4, Offload.MODEL),  # 8-bit's transformer does not fit 8 GB: 4-bit's does
    ],
)
def test_auto_tier_per_card(
    card_gb: int, capability: tuple[int, int], quantize: Quantize, offload: Offload
) -> None:
    chosen = tier(card_gb, capability)
    assert (chosen.quantize, chosen.offload) == (quantize, offload), chosen.reason
    assert "GiB free" in chosen.reason and "\n" not in chosen.reason


def test_auto_tier_without_the_quantization_packages() -> None:
    def chosen(card_gb: int, installed: frozenset[str]) -> tuple[Quantize, Offload]:
        t = tier(card_gb, ADA, installed)
        return t.quantize, t.offload

    torchao_only = frozenset({"torchao"})
    assert chosen(16, torchao_only) == (Quantize.FP8, Offload.NONE)
    assert chosen(8, torchao_only) == (Quantize.NONE, Offload.SEQUENTIAL)  # no 4-bit: sequential last
    # nothing installed: 16-bit, one component at a time where the transformer fits, else sequential
    assert chosen(16, frozenset()) == (Quantize.NONE, Offload.MODEL)
    assert chosen(12, frozenset()) == (Quantize.NONE, Offload.SEQUENTIAL)
    assert "nothing else fits" in tier(12, ADA, frozenset()).reason


def test_explicit_quantize_or_offload_keeps_only_their_tiers() -> None:
    forced = tier(141, quantize=Quantize.INT8)
    assert (forced.quantize, forced.offload) == (
        Quantize.INT8,
        Offload.NONE,
    ) and "QUANTIZE=int8" in forced.reason
    offloaded = tier(24, offload=Offload.MODEL)
    assert (offloaded.quantize, offloaded.offload) == (Quantize.NONE, Offload.MODEL)
    squeezed = tier(4, quantize=Quantize.FP8, offload=Offload.NONE)
    assert (squeezed.quantize, squeezed.offload) == (Quantize.FP8, Offload.NONE)
    assert "may run out of memory" in squeezed.reason


def test_an_unavailable_backend_is_one_line_naming_what_to_do() -> None:
    def why(
        q: Quantize, cuda: bool = True, capability: Any = HOPPER, installed: frozenset[str] = EVERYTHING
    ) -> str:
        return unavailable_reason(q, cuda=cuda, capability=capability, installed=installed) or ""

    assert "pip install bitsandbytes" in why(Quantize.NF4, installed=frozenset({"torchao"}))
    assert "pip install torchao" in why(Quantize.INT8, installed=frozenset())
    assert "QUANTIZE=int8" in why(Quantize.NF4, cuda=False, capability=None)
    assert "8.9" in why(Quantize.FP8, capability=AMPERE)
    assert why(Quantize.INT8, cuda=False, capability=None) == ""  # int8 runs on the CPU
    cpu = Settings(_env_file=None, quantize=Quantize.NF4)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="nf4") as err:
        decide_plan(cpu, cuda=False, installed=EVERYTHING)
    assert "\n" not in str(err.value)


def test_plan_states_tier_attention_and_compile() -> None:
    settings = Settings(_env_file=None, compile=True)  # type: ignore[call-arg]
    plan = decide_plan(
        settings, cuda=True, free_bytes=free_on(16), weights_bytes=Z_IMAGE.weights_bytes, capability=ADA,
        installed=EVERYTHING, largest_share=Z_IMAGE.largest_share,
    )  # fmt: skip
    assert (plan.quantize, plan.offload, plan.attention, plan.compile) == (
        Quantize.FP8, Offload.NONE, Attention.NATIVE, True,
    )  # fmt: skip
    line = plan.describe()
    assert "tier fp8 weights" in line and "attention native" in line and "compile on" in line
    assert "GiB free" in line  # the reason
    cpu = decide_plan(Settings(_env_file=None), cuda=False, installed=EVERYTHING)  # type: ignore[call-arg]
    assert (cpu.tier, cpu.quantize) == ("float32", Quantize.NONE)  # a CPU quantizes only when asked


def test_attention_choice() -> None:
    flash = frozenset({"flash_attn", "flash_attn_interface"})
    assert (
        choose_attention(Attention.AUTO, cuda=True, capability=HOPPER, installed=flash)[0] is Attention.FLASH3
    )
    assert choose_attention(Attention.AUTO, cuda=True, capability=ADA, installed=flash)[0] is Attention.FLASH
    assert (
        choose_attention(Attention.AUTO, cuda=True, capability=ADA, installed=frozenset())[0]
        is Attention.NATIVE
    )
    assert (
        choose_attention(Attention.AUTO, cuda=False, capability=None, installed=flash)[0] is Attention.NATIVE
    )
    # sage is opt-in only: 8-bit attention changes the pictures a little
    sage = frozenset({"sageattention"})
    assert (
        choose_attention(Attention.AUTO, cuda=True, capability=HOPPER, installed=sage)[0] is Attention.NATIVE
    )
    assert choose_attention(Attention.SAGE, cuda=True, capability=HOPPER, installed=sage)[0] is Attention.SAGE
    for setting, installed, cuda, text in [
        (Attention.FLASH, frozenset(), True, "flash-attn"),
        (Attention.FLASH3, flash, True, "Hopper"),
        (Attention.SAGE, sage, False, "CUDA"),
    ]:
        with pytest.raises(ConfigError, match=text) as err:
            choose_attention(setting, cuda=cuda, capability=ADA, installed=installed)
        assert "ATTENTION=native" in str(err.value) or "flash" in str(err.value)


def test_speed_settings_are_validated_in_one_line() -> None:
    settings = load_settings(_env_file=None, quantize="fp8", attention="flash3", compile="true",
                             compile_sizes="1024x768, 768x1024")  # fmt: skip
    assert settings.compile_sizes == [(1024, 768), (768, 1024)] and settings.compile
    for name, value in [("quantize", "int4"), ("attention", "xformers"), ("compile", "maybe"),
                        ("compile_sizes", "1024*768")]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"invalid setting {name.upper()}") as err:
            load_settings(_env_file=None, **{name: value})
        assert "\n" not in str(err.value)


def test_warm_sizes_are_the_default_named_and_compile_sizes_once_each() -> None:
    profile = resolve_profile("z-image-turbo")
    sizes = warm_sizes(profile, [(1024, 1024), (1280, 720)])
    assert sizes[0] == (1024, 1024) and sizes[-1] == (1280, 720)
    assert set(profile.sizes.values()) <= set(sizes) and len(sizes) == len(set(sizes))
    with pytest.raises(ConfigError, match=r"COMPILE_SIZES: 1000x1000 .*multiples of 16"):
        warm_sizes(profile, [(1000, 1000)])


# ---------------------------------------------------------------------------- on the CPU, tiny model


def draw(pipe: Any, steps: int = 2) -> np.ndarray:
    request = DrawRequest(prompt="a red fox in snow", width=64, height=64, steps=steps, guidance=0.0)
    [image] = call_pipeline(pipe, request, (7,))
    return np.asarray(image, dtype=np.int16)


def test_int8_weights_load_and_draw_on_the_cpu(tiny_settings: Settings) -> None:
    pytest.importorskip("torchao")
    from torchao.quantization import Int8Tensor

    plain, _, _ = load_pipeline(tiny_settings)
    pipe, _, plan = load_pipeline(tiny_settings.model_copy(update={"quantize": Quantize.INT8}))
    assert plan.quantize is Quantize.INT8 and plan.tier == "int8 weights"
    for module in (pipe.transformer, pipe.text_encoder):  # both hold nearly all the weights
        weights = [m.weight for m in module.modules() if type(m).__name__ == "Linear"]
        assert weights and all(isinstance(w, Int8Tensor) for w in weights)
    quantized, reference = draw(pipe), draw(plain)
    assert quantized.shape == (64, 64, 3) and quantized.std() > 0  # a picture, not a blank
    # the same picture, give or take the rounding of 8-bit weights
    assert np.abs(quantized - reference).mean() < 8


def test_native_attention_and_compiled_blocks_draw_the_same_picture(
    tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the loading path with COMPILE=true; dynamo traces each block whole (``fullgraph``).

    ``aot_eager`` runs the traced graphs without inductor's C++ code generation, which took
    86 s on this shared 2-core machine against about 10 s: the tracing is what breaks when a
    block cannot be compiled whole; the GPU benchmark compiles with inductor.
    """
    import torch

    monkeypatch.setattr(
        acceleration, "COMPILE_OPTIONS", {**acceleration.COMPILE_OPTIONS, "backend": "aot_eager"}
    )
    plain, _, _ = load_pipeline(tiny_settings)
    settings = tiny_settings.model_copy(update={"attention": Attention.NATIVE, "compile": True})
    pipe, _, plan = load_pipeline(settings)
    assert (plan.attention, plan.compile) == (Attention.NATIVE, True)
    blocks = [m for m in pipe.transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert blocks, "no block was compiled"
    try:
        compiled, reference = draw(pipe, steps=1), draw(plain, steps=1)
    finally:
        torch._dynamo.reset()
    assert np.abs(compiled - reference).max() <= 2


class _Recording:
    """A stand-in pipeline that records the sizes it is called at (for the warm-up)."""

    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def __call__(self, **kw: Any) -> Any:
        from PIL import Image

        self.sizes.append((kw["width"], kw["height"]))
        return type("Out", (), {"images": [Image.new("RGB", (kw["width"], kw["height"]))]})()


async def test_worker_warms_every_size_to_compile_before_it_is_ready(tiny_settings: Settings) -> None:
    settings = tiny_settings.model_copy(
        update={"compile": True, "warmup": True, "compile_sizes": [(128, 64)]}
    )
    pipe = _Recording()

    def factory(s: Settings) -> Any:
        profile = resolve_profile(s.model)
        plan = LoadPlan(device="cpu", dtype=s.dtype, offload=Offload.NONE, reason="test", compile=True)
        return pipe, profile, plan

    async with Worker(settings, pipeline_factory=factory) as worker:
        assert pipe.sizes == warm_sizes(worker.profile, [(128, 64)])
        assert (128, 64) in pipe.sizes and len(pipe.sizes) >= 2
    plain = _Recording()
    uncompiled = dataclasses.replace(
        LoadPlan(device="cpu", dtype=settings.dtype, offload=Offload.NONE, reason="")
    )
    async with Worker(settings, pipeline_factory=lambda s: (plain, resolve_profile(s.model), uncompiled)):
        assert plain.sizes == [(64, 64)]  # no compile: one warm-up at the default size
    with pytest.raises(BotError, match="COMPILE_SIZES"):
        Worker(settings.model_copy(update={"compile_sizes": [(100, 64)]}))


class _Transformer:
    """Records the backends set; refuses the ones not "installed"."""

    def __init__(self, refuses: set[str]) -> None:
        self.refuses, self.set = refuses, []

    def set_attention_backend(self, name: str) -> None:
        if name in self.refuses:
            raise RuntimeError(f"{name} kernels are not available\nmore detail")
        self.set.append(name)


def test_an_auto_backend_that_fails_falls_back_to_native_an_explicit_one_stops() -> None:
    pipe = type("Pipe", (), {})()
    pipe.transformer = _Transformer({"flash"})  # type: ignore[attr-defined]
    assert acceleration.apply_attention(pipe, Attention.FLASH, explicit=False) is Attention.NATIVE
    assert pipe.transformer.set == ["native"]  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"ATTENTION=flash failed: flash kernels are not available$"):
        acceleration.apply_attention(pipe, Attention.FLASH, explicit=True)
    assert acceleration.apply_attention(pipe, Attention.NATIVE, explicit=False) is Attention.NATIVE
    assert pipe.transformer.set == ["native"]  # type: ignore[attr-defined]  # nothing to switch


@pytest.mark.parametrize("quantize", [Quantize.FP8, Quantize.INT8, Quantize.NF4])
def test_each_precision_maps_the_transformer_and_text_encoder_to_their_librarys_config(
    quantize: Quantize,
) -> None:
    """fp8 and nf4 run on CUDA only; their configs are built (and checked here) the same way."""
    import diffusers
    import torch
    import transformers

    from generation.precision import quantization_config

    pytest.importorskip("torchao" if quantize is not Quantize.NF4 else "bitsandbytes")
    components = {"transformer": "diffusers", "text_encoder": "transformers", "vae": "diffusers"}
    config = quantization_config(quantize, torch.bfloat16, components)
    mapping = config.quant_mapping
    assert set(mapping) == {"transformer", "text_encoder"}  # the VAE stays 16-bit
    name = "BitsAndBytesConfig" if quantize is Quantize.NF4 else "TorchAoConfig"
    assert isinstance(mapping["transformer"], getattr(diffusers, name))
    assert isinstance(mapping["text_encoder"], getattr(transformers, name))
    assert quantization_config(Quantize.NONE, torch.bfloat16, components) is None

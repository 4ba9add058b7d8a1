"""Weight precision: the memory tiers ``QUANTIZE=auto`` chooses from, and diffusers' quantization configs.

Backends: torchao for the 8-bit tiers (``fp8``: float8 weights and activations, fast matmuls on
compute capability 8.9 and newer; ``int8``: int8 weight-only, any CUDA card and the CPU) and
bitsandbytes for ``nf4`` (4-bit NormalFloat, CUDA only). torchao is the one backend that runs in
the CPU tests and has fp8 kernels that speed Hopper up as well as shrink the model; bitsandbytes'
NF4 is the 4-bit format most checked for quality, and diffusers refuses it without CUDA. Each
config goes to its component through ``PipelineQuantizationConfig(quant_mapping=...)`` (the
``quant_backend=`` shortcut fails for Z-Image).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bot.config import Offload, Quantize
from bot.errors import ConfigError

#: the weights on the GPU × this (allocator slack), plus WORKSPACE for activations and the VAE decode
HEADROOM = 1.1
WORKSPACE = int(1.5 * 1024**3)
#: bytes per weight against 16-bit, scales included
WEIGHT_FACTOR: Mapping[Quantize, float] = {
    Quantize.NONE: 1.0,
    Quantize.FP8: 0.52,
    Quantize.INT8: 0.52,
    Quantize.NF4: 0.28,
}
#: the share of the weights in the quantized components (transformer and text encoder; not the VAE)
QUANTIZED_SHARE = 0.99
#: float8 matmuls need Ada or Hopper (compute capability 8.9 and newer)
FP8_CAPABILITY = (8, 9)
#: the components quantized: the denoiser and the text encoder hold nearly all the weights
COMPONENTS = ("transformer", "unet", "text_encoder")
#: the package each backend needs
PACKAGES: Mapping[Quantize, str] = {
    Quantize.FP8: "torchao",
    Quantize.INT8: "torchao",
    Quantize.NF4: "bitsandbytes",
}

_GIB = 1024**3


@dataclass(frozen=True, slots=True, kw_only=True)
class Tier:
    """A weight precision and an offload mode, and why they were chosen."""

    quantize: Quantize
    offload: Offload
    reason: str


def installed_packages() -> frozenset[str]:
    """Which quantization packages can be imported here (without importing them)."""
    return frozenset(p for p in set(PACKAGES.values()) if importlib.util.find_spec(p) is not None)


def unavailable_reason(
    quantize: Quantize, *, cuda: bool, capability: tuple[int, int] | None, installed: frozenset[str]
) -> str | None:
    """Why ``quantize`` cannot run here, as the one-line error an operator reads; None when it can."""
    if quantize in (Quantize.AUTO, Quantize.NONE):
        return None
    package = PACKAGES[quantize]
    if package not in installed:
        return f"QUANTIZE={quantize.value} needs {package}: pip install {package}, or choose QUANTIZE=none"
    if quantize is Quantize.NF4 and not cuda:
        return "QUANTIZE=nf4 needs a CUDA GPU (bitsandbytes); on this device choose QUANTIZE=int8 or none"
    if quantize is Quantize.FP8 and (not cuda or capability is None or capability < FP8_CAPABILITY):
        where = "no CUDA GPU" if not cuda else f"compute capability {capability}"
        return f"QUANTIZE=fp8 needs compute capability 8.9 or newer ({where}); choose QUANTIZE=int8"
    return None


def available_quantizers(
    *, cuda: bool, capability: tuple[int, int] | None, installed: frozenset[str]
) -> frozenset[Quantize]:
    """The quantized precisions that run on this device with what is installed."""
    return frozenset(
        q
        for q in (Quantize.FP8, Quantize.INT8, Quantize.NF4)
        if unavailable_reason(q, cuda=cuda, capability=capability, installed=installed) is None
    )


def _gb(n: float) -> str:
    return f"{n / _GIB:.1f} GiB"


def _label(quantize: Quantize, offload: Offload) -> str:
    precision = "16-bit" if quantize is Quantize.NONE else quantize.value
    return precision if offload is Offload.NONE else f"{precision} + {offload.value} offload"


def needed_bytes(weights_bytes: int, quantize: Quantize, offload: Offload, *, largest_share: float) -> float:
    """GPU memory a tier needs: its weights (all, or the largest component under model offload) × headroom,
    plus the workspace."""
    factor = (1 - QUANTIZED_SHARE) + QUANTIZED_SHARE * WEIGHT_FACTOR[quantize]
    if offload is Offload.SEQUENTIAL:
        return 0.0  # one layer at a time: it runs wherever anything runs
    share = largest_share if offload is Offload.MODEL else 1.0
    return weights_bytes * factor * share * HEADROOM + WORKSPACE


def choose_tier(
    quantize: Quantize,
    offload: Offload,
    *,
    free_bytes: int | None,
    weights_bytes: int | None,
    largest_share: float,
    available: frozenset[Quantize],
) -> Tier:
    """The fastest tier that fits ``free_bytes`` of a CUDA device; a pure function.

    ``weights_bytes`` is the model's size in the dtype it loads in (doubled for float32),
    ``largest_share`` its largest component's share (what model offload keeps on the GPU at
    once), ``available`` the quantized precisions this device runs. Tiers, best first: 16-bit
    on the device; 8-bit on the device (fp8 where available, else int8); 8-bit with model
    offload; 4-bit on the device; 4-bit with model offload; 16-bit with model offload;
    sequential offload last. An explicit ``quantize`` or ``offload`` keeps only the tiers with
    that value; when none fits, the most frugal of them is chosen and the reason says so.
    """
    eight = (
        Quantize.FP8 if Quantize.FP8 in available else Quantize.INT8 if Quantize.INT8 in available else None
    )
    four = Quantize.NF4 if Quantize.NF4 in available else None
    ladder: list[tuple[Quantize | None, Offload]]
    if quantize is not Quantize.AUTO:
        ladder = [(quantize, o) for o in (Offload.NONE, Offload.MODEL, Offload.SEQUENTIAL)]
    else:
        ladder = [
            (Quantize.NONE, Offload.NONE),
            (eight, Offload.NONE),
            (eight, Offload.MODEL),
            (four, Offload.NONE),
            (four, Offload.MODEL),
            (Quantize.NONE, Offload.MODEL),
            (Quantize.NONE, Offload.SEQUENTIAL),
        ]
    if offload is not Offload.AUTO:
        # the offload is fixed: the best precision that fits with it
        order = [quantize] if quantize is not Quantize.AUTO else [Quantize.NONE, eight, four]
        ladder = [(q, offload) for q in order]
    tiers: list[tuple[Quantize, Offload]] = [(q, o) for q, o in ladder if q is not None]
    explicit = [f"QUANTIZE={quantize.value}"] if quantize is not Quantize.AUTO else []
    explicit += [f"OFFLOAD={offload.value}"] if offload is not Offload.AUTO else []
    prefix = ", ".join(explicit) + "; " if explicit else ""
    if not weights_bytes or free_bytes is None:
        q, o = tiers[0]
        return Tier(quantize=q, offload=o, reason=f"{prefix}model size or free memory unknown")
    for q, o in tiers:
        need = needed_bytes(weights_bytes, q, o, largest_share=largest_share)
        if need <= free_bytes:
            if o is Offload.SEQUENTIAL:
                why = f"nothing else fits {_gb(free_bytes)} free"
            else:
                why = f"{_label(q, o)} needs {_gb(need)}, {_gb(free_bytes)} free"
            return Tier(quantize=q, offload=o, reason=prefix + why)
    q, o = tiers[-1]
    need = needed_bytes(weights_bytes, q, o, largest_share=largest_share)
    return Tier(
        quantize=q,
        offload=o,
        reason=f"{prefix}{_label(q, o)} needs {_gb(need)}, only {_gb(free_bytes)} free: it may run out of memory",
    )


# ---------------------------------------------------------------------------- diffusers configs


def _torchao_type(quantize: Quantize) -> Any:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig

    if quantize is Quantize.FP8:
        return Float8DynamicActivationFloat8WeightConfig()
    return Int8WeightOnlyConfig()


def _component_config(quantize: Quantize, compute_dtype: Any, library: str) -> Any:
    """One component's config, from diffusers (the transformer) or transformers (the text encoder)."""
    if library == "diffusers":
        import diffusers as lib
    else:
        import transformers as lib  # type: ignore[no-redef]
    if quantize is Quantize.NF4:
        return lib.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    if library == "diffusers":
        return lib.TorchAoConfig(_torchao_type(quantize))
    return lib.TorchAoConfig(quant_type=_torchao_type(quantize))


def quantization_config(quantize: Quantize, compute_dtype: Any, components: Mapping[str, str]) -> Any:
    """``PipelineQuantizationConfig`` for ``components`` (name → ``diffusers``/``transformers``); None for 16-bit."""
    if quantize in (Quantize.NONE, Quantize.AUTO):
        return None
    from diffusers import PipelineQuantizationConfig

    mapping = {
        name: _component_config(quantize, compute_dtype, library)
        for name, library in components.items()
        if name in COMPONENTS
    }
    return PipelineQuantizationConfig(quant_mapping=mapping) if mapping else None


def component_libraries(model_index: Mapping[str, Any]) -> dict[str, str]:
    """Each component's library from a ``model_index.json`` (``"transformer": ["diffusers", "..."]``)."""
    found: dict[str, str] = {}
    for name, value in model_index.items():
        if isinstance(value, list) and value and value[0] in ("diffusers", "transformers"):
            found[name] = str(value[0])
    return found


def require_quantize(
    quantize: Quantize, *, cuda: bool, capability: tuple[int, int] | None, installed: frozenset[str]
) -> None:
    """Raise ``ConfigError`` (one line) when an explicit QUANTIZE cannot run here."""
    reason = unavailable_reason(quantize, cuda=cuda, capability=capability, installed=installed)
    if reason is not None:
        raise ConfigError(reason)

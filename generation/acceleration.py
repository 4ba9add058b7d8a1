"""Speed switches on a loaded pipeline: the attention backend and regional compilation, and the sizes to warm.

``ATTENTION`` maps to diffusers' attention backends (``transformer.set_attention_backend``):
``native`` is PyTorch's scaled-dot-product attention (which picks flash or memory-efficient
kernels itself on CUDA), ``flash`` the flash-attn package (FlashAttention 2), ``flash3``
FlashAttention 3 (Hopper, ``flash_attn_interface``), ``sage`` SageAttention (8-bit attention:
fast, slightly different images, so ``auto`` never picks it). ``COMPILE`` compiles the
transformer's repeated blocks (``compile_repeated_blocks(fullgraph=True)``): one block is
compiled and reused for all of them, so the first call takes seconds rather than minutes.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from bot.config import Attention
from bot.domain import ModelProfile
from bot.errors import ConfigError, first_line

_log = logging.getLogger(__name__)

#: diffusers' name of each backend
BACKENDS: Mapping[Attention, str] = {
    Attention.NATIVE: "native",
    Attention.FLASH: "flash",
    Attention.FLASH3: "_flash_3",
    Attention.SAGE: "sage",
}
#: the module each backend imports, and the package that installs it
PACKAGES: Mapping[Attention, tuple[str, str]] = {
    Attention.FLASH: ("flash_attn", "flash-attn"),
    Attention.FLASH3: ("flash_attn_interface", "FlashAttention 3 (flash-attn's hopper/ build)"),
    Attention.SAGE: ("sageattention", "sageattention"),
}
#: ``compile_repeated_blocks`` arguments: one graph per block (a graph break is an error, not a slow path)
COMPILE_OPTIONS: dict[str, Any] = {"fullgraph": True}
#: FlashAttention 3 runs on Hopper only
FLASH3_CAPABILITY = (9, 0)


def attention_packages() -> frozenset[str]:
    """Which attention modules can be imported here (without importing them)."""
    return frozenset(m for m, _ in PACKAGES.values() if importlib.util.find_spec(m) is not None)


def _unavailable(
    attention: Attention, *, cuda: bool, capability: tuple[int, int] | None, installed: frozenset[str]
) -> str | None:
    if attention in (Attention.AUTO, Attention.NATIVE):
        return None
    module, package = PACKAGES[attention]
    if not cuda:
        return f"ATTENTION={attention.value} needs a CUDA GPU; choose ATTENTION=native"
    if module not in installed:
        return f"ATTENTION={attention.value} needs {package} installed; choose ATTENTION=native or auto"
    if attention is Attention.FLASH3 and (capability is None or capability[0] != FLASH3_CAPABILITY[0]):
        return f"ATTENTION=flash3 needs a Hopper GPU (compute capability 9.x, not {capability}); choose flash"
    return None


def choose_attention(
    attention: Attention, *, cuda: bool, capability: tuple[int, int] | None, installed: frozenset[str]
) -> tuple[Attention, str]:
    """The backend to use and, for ``auto``, why (empty otherwise); an explicit one that cannot run raises.

    ``auto``: FlashAttention 3 on Hopper where installed, then FlashAttention 2, else native.
    """
    if attention is not Attention.AUTO:
        reason = _unavailable(attention, cuda=cuda, capability=capability, installed=installed)
        if reason is not None:
            raise ConfigError(reason)
        return attention, ""
    for candidate in (Attention.FLASH3, Attention.FLASH):
        if _unavailable(candidate, cuda=cuda, capability=capability, installed=installed) is None:
            return candidate, f"attention auto: {candidate.value} installed"
    return Attention.NATIVE, ""


def apply_attention(pipe: Any, attention: Attention, *, explicit: bool) -> Attention:
    """Set the transformer's attention backend; the one set (an ``auto`` choice falls back to native).

    A pipeline without ``set_attention_backend`` (a UNet model) keeps its processors: native.
    """
    if attention is Attention.NATIVE and not explicit:
        return attention  # what a freshly loaded model runs anyway: nothing to switch
    denoiser = getattr(pipe, "transformer", None)
    if denoiser is None or not hasattr(denoiser, "set_attention_backend"):
        if explicit and attention is not Attention.NATIVE:
            raise ConfigError(f"ATTENTION={attention.value}: this model has no diffusers attention backends")
        return Attention.NATIVE
    try:
        denoiser.set_attention_backend(BACKENDS[attention])
    except (ImportError, RuntimeError, ValueError) as exc:
        if explicit or attention is Attention.NATIVE:
            raise ConfigError(f"ATTENTION={attention.value} failed: {first_line(exc, 200)}") from None
        _log.warning("attention %s failed (%s); using native", attention.value, first_line(exc, 200))
        denoiser.set_attention_backend(BACKENDS[Attention.NATIVE])
        return Attention.NATIVE
    return attention


def compile_blocks(pipe: Any) -> None:
    """Compile the denoiser's repeated blocks (``fullgraph=True``); compilation itself runs on first call."""
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if denoiser is None or not hasattr(denoiser, "compile_repeated_blocks"):
        raise ConfigError("COMPILE=true: this model has no repeated blocks to compile; set COMPILE=false")
    try:
        denoiser.compile_repeated_blocks(**COMPILE_OPTIONS)
    except ValueError as exc:  # a model class that does not name its repeated blocks
        raise ConfigError(f"COMPILE=true: {first_line(exc, 200)}; set COMPILE=false") from None


def warm_sizes(profile: ModelProfile, extra: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The sizes to compile at start: the default, the named sizes, then ``COMPILE_SIZES``, once each.

    A ``COMPILE_SIZES`` entry the model cannot draw raises ``ConfigError`` naming it.
    """
    sizes = [(profile.default_width, profile.default_height), *profile.sizes.values()]
    m, lo, hi = profile.size_multiple, profile.min_side, profile.max_side
    for width, height in extra:
        if width % m or height % m or not (lo <= width <= hi and lo <= height <= hi):
            raise ConfigError(
                f"COMPILE_SIZES: {width}x{height} cannot be drawn by {profile.name}: "
                f"width and height must be multiples of {m} from {lo} to {hi}"
            )
        sizes.append((width, height))
    return list(dict.fromkeys(sizes))

"""Where and how to load the model (device, dtype, memory tier, attention, compile) and the loading itself."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.config import Attention, Device, DType, Offload, Quantize, Settings
from bot.domain import ModelProfile
from bot.errors import ConfigError, first_line
from generation.acceleration import apply_attention, attention_packages, choose_attention, compile_blocks
from generation.precision import (
    available_quantizers,
    choose_tier,
    component_libraries,
    installed_packages,
    quantization_config,
    require_quantize,
)
from generation.presets import (
    PRESETS,
    TINY,
    TINY_PRESETS,
    cached_snapshot,
    is_local,
    preferred_dtype,
    repo_for,
    resolve_profile,
)
from generation.tiny import MARKER_FILE, TINY_BUILDERS, marker_preset

_log = logging.getLogger(__name__)

_GIB = 1024**3
#: the largest component's share of a model that is no preset (what model offload keeps on the GPU)
LARGEST_SHARE = 0.75

#: returns the free bytes of the CUDA device, or None when unknown
FreeBytesFn = Callable[[], int | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadPlan:
    """Where and how the pipeline runs: ``device`` is ``cuda``, ``mps`` or ``cpu``; ``reason`` says why.

    ``quantize`` is the decided weight precision (``none`` is the 16-bit or float32 ``dtype``),
    ``attention`` the decided backend, ``compile`` whether the repeated blocks get compiled.
    """

    device: str
    dtype: DType
    offload: Offload
    reason: str
    quantize: Quantize = Quantize.NONE
    attention: Attention = Attention.NATIVE
    compile: bool = False

    @property
    def tier(self) -> str:
        """The memory tier in a few words: ``bfloat16``, ``fp8 weights``, ``int8 weights + model offload``."""
        weights = self.dtype.value if self.quantize is Quantize.NONE else f"{self.quantize.value} weights"
        return weights if self.offload is Offload.NONE else f"{weights} + {self.offload.value} offload"

    def describe(self) -> str:
        """The decision as one log line."""
        return (
            f"device plan: {self.device}, tier {self.tier}, attention {self.attention.value}, "
            f"compile {'on' if self.compile else 'off'} ({self.reason})"
        )


def _gb(n: int) -> str:
    return f"{n / _GIB:.1f} GiB"


def decide_plan(
    settings: Settings,
    *,
    cuda: bool,
    mps: bool = False,
    bf16_supported: bool = True,
    free_bytes: int | None = None,
    weights_bytes: int | None = None,
    preferred: DType = DType.BFLOAT16,
    capability: tuple[int, int] | None = None,
    installed: frozenset[str] = frozenset(),
    largest_share: float = LARGEST_SHARE,
) -> LoadPlan:
    """Decide device, dtype, memory tier, attention and compilation from what the machine has; pure.

    ``weights_bytes`` is the model's size in 16-bit weights (doubled when it will run in
    float32); ``free_bytes`` is the GPU's free memory, ``capability`` its compute capability;
    ``installed`` the optional packages importable here (torchao, bitsandbytes, flash_attn...).
    Explicit settings win; a setting the machine cannot honour raises ``ConfigError``. For
    ``auto``: CUDA, else MPS, else CPU; bf16 on CUDA (fp16 where bf16 is unsupported), fp16 on
    MPS, float32 on CPU; on CUDA the tier from ``precision.choose_tier`` (16-bit when weights ×
    1.1 + 1.5 GiB fit free memory, then 8-bit, 8-bit with model offload, 4-bit, ..., sequential
    offload last); elsewhere 16/32-bit on the device unless QUANTIZE says otherwise.
    """
    reasons: list[str] = []
    if settings.device is Device.AUTO:
        device = "cuda" if cuda else "mps" if mps else "cpu"
        reasons.append(f"auto: {'CUDA' if cuda else 'MPS' if mps else 'no GPU'} found")
    else:
        device = settings.device.value
        if device == "cuda" and not cuda:
            raise ConfigError("DEVICE=cuda but torch sees no CUDA device")
        if device == "mps" and not mps:
            raise ConfigError("DEVICE=mps but torch sees no MPS device")
        reasons.append(f"DEVICE={device}")

    dtype: DType
    if settings.dtype is not DType.AUTO:
        dtype = settings.dtype
    elif device == "cuda":
        dtype = preferred
        if dtype is DType.BFLOAT16 and not bf16_supported:
            dtype = DType.FLOAT16
            reasons.append("no bf16 on this GPU")
    elif device == "mps":
        dtype = DType.FLOAT16 if preferred is not DType.FLOAT32 else DType.FLOAT32
    else:
        dtype = DType.FLOAT32

    quantize = settings.quantize
    require_quantize(quantize, cuda=device == "cuda", capability=capability, installed=installed)
    if device != "cuda":
        if settings.offload in (Offload.MODEL, Offload.SEQUENTIAL):
            raise ConfigError(f"OFFLOAD={settings.offload.value} needs a CUDA device (DEVICE is {device})")
        offload = Offload.NONE
        # on a CPU or a Mac nothing is short of memory the way a GPU is: quantize only when asked
        quantize = Quantize.NONE if quantize is Quantize.AUTO else quantize
        if quantize is not Quantize.NONE:
            reasons.append(f"QUANTIZE={quantize.value}")
    else:
        tier = choose_tier(
            quantize,
            settings.offload,
            free_bytes=free_bytes,
            weights_bytes=weights_bytes * (2 if dtype is DType.FLOAT32 else 1) if weights_bytes else None,
            largest_share=largest_share,
            available=available_quantizers(cuda=True, capability=capability, installed=installed),
        )
        quantize, offload = tier.quantize, tier.offload
        reasons.append(tier.reason)
    attention, why = choose_attention(
        settings.attention, cuda=device == "cuda", capability=capability, installed=installed
    )
    if why:
        reasons.append(why)
    compile_on = settings.compile
    if compile_on and offload is Offload.SEQUENTIAL:
        compile_on = False
        reasons.append("no compile under sequential offload (its hooks break the compiled graph)")
    return LoadPlan(
        device=device,
        dtype=dtype,
        offload=offload,
        reason="; ".join(reasons),
        quantize=quantize,
        attention=attention,
        compile=compile_on,
    )


def _safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors") if f.is_file())


def estimate_weights_bytes(model: str, cache_dir: Path | None = None) -> int | None:
    """The model's weight size: the preset's figure, or the sum of its safetensors files.

    A preset's figure is known whether or not it is downloaded (see ``cached_snapshot`` for
    that); a hub model that is not cached yet has no known size (None).
    """
    preset = PRESETS.get(model)
    if preset is not None:
        return preset.weights_bytes
    if is_local(model):
        return _safetensors_bytes(Path(model).expanduser()) or None
    snapshot = cached_snapshot(model, cache_dir)
    return (_safetensors_bytes(snapshot) or None) if snapshot is not None else None


def _cuda_free_bytes() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def _capability() -> tuple[int, int] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return int(major), int(minor)


def plan_device(settings: Settings, free_bytes_fn: FreeBytesFn | None = None) -> LoadPlan:
    """Probe torch for devices, free memory and packages, decide with ``decide_plan``, log it in one line."""
    import torch

    cuda = torch.cuda.is_available()
    mps_backend = getattr(torch.backends, "mps", None)
    mps = bool(mps_backend is not None and mps_backend.is_available())
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    free = (free_bytes_fn or _cuda_free_bytes)() if cuda else None
    preset = PRESETS.get(settings.model)
    plan = decide_plan(
        settings,
        cuda=cuda,
        mps=mps,
        bf16_supported=bf16,
        free_bytes=free,
        weights_bytes=estimate_weights_bytes(settings.model, settings.model_cache_dir),
        preferred=preferred_dtype(settings.model),
        capability=_capability() if cuda else None,
        installed=installed_packages() | attention_packages(),
        largest_share=preset.largest_share if preset is not None else LARGEST_SHARE,
    )
    _log.info("%s", plan.describe())
    return plan


def torch_dtype(dtype: DType) -> Any:
    """The torch dtype of a ``DType`` setting (``auto`` must be decided first)."""
    import torch

    table = {DType.BFLOAT16: torch.bfloat16, DType.FLOAT16: torch.float16, DType.FLOAT32: torch.float32}
    if dtype not in table:
        raise ValueError(f"undecided dtype {dtype}")
    return table[dtype]


def ensure_tiny(folder: Path, preset: str = TINY) -> Path:
    """A tiny pipeline's folder (``tiny``, ``tiny-sd`` or ``tiny-sdxl``), built on first use, then reused."""
    if (folder / "model_index.json").is_file() and (folder / MARKER_FILE).is_file():
        if marker_preset(folder) == preset:
            return folder
    return TINY_BUILDERS[preset](folder)


def _source(settings: Settings) -> tuple[str, dict[str, Any]]:
    """What to pass to from_pretrained, and the extra keyword arguments it needs."""
    model = settings.model
    if model in TINY_PRESETS:
        return str(ensure_tiny(settings.model_cache_dir / model, model)), {}
    return repo_for(model), {} if is_local(model) else {"cache_dir": str(settings.model_cache_dir)}


def device_index(settings: Settings) -> int | None:
    """The CUDA device number of a worker given one ``cuda:N`` (``DEVICE=cuda:0,cuda:1``), else None."""
    if len(settings.devices) == 1 and settings.devices[0].startswith("cuda:"):
        return int(settings.devices[0].partition(":")[2])
    return None


def load_pipeline(
    settings: Settings, *, profile: ModelProfile | None = None, free_bytes_fn: FreeBytesFn | None = None
) -> tuple[Any, ModelProfile, LoadPlan]:
    """Load MODEL with ``DiffusionPipeline.from_pretrained`` and place it per the device plan.

    ``profile`` is MODEL's profile where the caller has already resolved it (the worker
    has); it is resolved here otherwise. Blocking (seconds to minutes): call it from the
    worker thread. A model that cannot be loaded (not downloaded while offline, a broken
    folder) raises one ``ConfigError`` line.
    """
    from diffusers import DiffusionPipeline

    if profile is None:
        profile = resolve_profile(settings.model, cache_dir=settings.model_cache_dir)
    plan = plan_device(settings, free_bytes_fn)
    source, extra = _source(settings)
    dtype = torch_dtype(plan.dtype)
    if plan.quantize is not Quantize.NONE:
        config = quantization_config(plan.quantize, dtype, _components(source, extra))
        if config is None:
            raise ConfigError(
                f"QUANTIZE={plan.quantize.value}: MODEL={settings.model} has no component to quantize"
            )
        extra = {**extra, "quantization_config": config}
    started = time.perf_counter()
    try:
        pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, use_safetensors=True, **extra)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load MODEL={settings.model}: {first_line(exc, 300)}") from exc
    index = device_index(settings)
    if plan.offload is Offload.MODEL:
        pipe.enable_model_cpu_offload(gpu_id=index)
    elif plan.offload is Offload.SEQUENTIAL:
        pipe.enable_sequential_cpu_offload(gpu_id=index)
    else:
        pipe.to(plan.device if index is None or plan.device != "cuda" else f"cuda:{index}")
    pipe.set_progress_bar_config(disable=True)
    attention = apply_attention(pipe, plan.attention, explicit=settings.attention is not Attention.AUTO)
    if attention is not plan.attention:
        plan = dataclasses.replace(
            plan, attention=attention, reason=f"{plan.reason}; {plan.attention.value} failed"
        )
    if plan.compile:
        compile_blocks(pipe)  # compiles on the first calls: the worker's warm-up makes them
    _log.info("loaded %s from %s in %.1f s", profile.name, source, time.perf_counter() - started)
    return pipe, profile, plan


def _components(source: str, extra: dict[str, Any]) -> dict[str, str]:
    """The pipeline's components and their libraries, from its ``model_index.json`` (local or cached)."""
    from huggingface_hub import hf_hub_download

    folder = Path(source)
    if (folder / "model_index.json").is_file():
        index_path = folder / "model_index.json"
    else:
        try:
            index_path = Path(hf_hub_download(source, "model_index.json", cache_dir=extra.get("cache_dir")))
        except Exception as exc:
            raise ConfigError(f"cannot read {source}'s model_index.json: {first_line(exc, 200)}") from exc
    return component_libraries(json.loads(index_path.read_text(encoding="utf-8")))


def doctor_report(settings: Settings) -> list[str]:
    """What ``python -m bot doctor`` says about torch, the devices, the plan and the model files.

    Probes the machine but loads no weights.
    """
    import sys

    import torch

    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            lines.append(f"cuda:{i} {torch.cuda.get_device_name(i)}: {_gb(free)} free of {_gb(total)}")
    else:
        lines.append("cuda: not available (CPU only)")
    lines.append(f"plan: {plan_device(settings).describe()}")
    found = sorted(installed_packages() | attention_packages())
    lines.append(
        f"speed packages: {', '.join(found) or 'none'} (of torchao, bitsandbytes, flash_attn, "
        "flash_attn_interface, sageattention)"
    )
    model = settings.model
    profile = resolve_profile(model, cache_dir=settings.model_cache_dir)
    lines.append(
        f"model: {model} -> {repo_for(model)} ({profile.family}, {profile.default_width}x{profile.default_height}, "
        f"{profile.default_steps} steps, cfg {profile.default_guidance:g})"
    )
    # resolve_profile has already refused anything that is no preset, existing folder or repo id
    if model in TINY_PRESETS:
        reachable = "built on first use (random weights: it draws noise)"
    elif is_local(model):
        reachable = "local folder found"
    elif (snapshot := cached_snapshot(repo_for(model), settings.model_cache_dir)) is None:
        reachable = f"not in the cache ({settings.model_cache_dir}): it will be downloaded on first start"
    elif weights := _safetensors_bytes(snapshot):
        reachable = f"in the cache ({_gb(weights)})"
    else:
        reachable = "partly in the cache: the weights will be downloaded on first start"
    lines.append(f"model files: {reachable}")
    return lines

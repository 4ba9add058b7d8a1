"""Where and how to load the model (device, dtype, offload) and the loading itself."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.config import Device, DType, Offload, Settings
from bot.domain import ModelProfile
from bot.errors import ConfigError, first_line
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
#: the weights plus activations, VAE decode and allocator slack must fit in free memory
HEADROOM = 1.2
#: below this much free GPU memory even whole-model offload (one component at a time) will not fit
MODEL_OFFLOAD_MIN_FREE = 6 * _GIB

#: returns the free bytes of the CUDA device, or None when unknown
FreeBytesFn = Callable[[], int | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadPlan:
    """Where the pipeline runs: ``device`` is ``cuda``, ``mps`` or ``cpu``; ``reason`` says why."""

    device: str
    dtype: DType
    offload: Offload
    reason: str

    def describe(self) -> str:
        """The decision as one log line."""
        return f"device plan: {self.device} {self.dtype.value}, offload {self.offload.value} ({self.reason})"


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
) -> LoadPlan:
    """Decide device, dtype and offload from what the machine has; a pure function.

    ``weights_bytes`` is the model's size in 16-bit weights (doubled when it will run in
    float32); ``free_bytes`` is the GPU's free memory. Explicit settings win; a setting the
    machine cannot honour raises ``ConfigError``. For ``auto``: CUDA, else MPS, else CPU;
    bf16 on CUDA (fp16 where bf16 is unsupported), fp16 on MPS, float32 on CPU; all on the
    GPU when weights × 1.2 fit free memory, model offload when not but at least 6 GiB are
    free, sequential offload below that.
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

    if device != "cuda":
        if settings.offload in (Offload.MODEL, Offload.SEQUENTIAL):
            raise ConfigError(f"OFFLOAD={settings.offload.value} needs a CUDA device (DEVICE is {device})")
        offload = Offload.NONE
    elif settings.offload is not Offload.AUTO:
        offload = settings.offload
        reasons.append(f"OFFLOAD={offload.value}")
    elif not weights_bytes or free_bytes is None:
        offload = Offload.NONE
        reasons.append("model size or free memory unknown")
    else:
        need = weights_bytes * (2 if dtype is DType.FLOAT32 else 1) * HEADROOM
        if need <= free_bytes:
            offload = Offload.NONE
            reasons.append(f"needs {_gb(int(need))}, {_gb(free_bytes)} free")
        elif free_bytes >= MODEL_OFFLOAD_MIN_FREE:
            offload = Offload.MODEL
            reasons.append(f"needs {_gb(int(need))}, only {_gb(free_bytes)} free")
        else:
            offload = Offload.SEQUENTIAL
            reasons.append(
                f"needs {_gb(int(need))}, only {_gb(free_bytes)} free (< {_gb(MODEL_OFFLOAD_MIN_FREE)})"
            )
    return LoadPlan(device=device, dtype=dtype, offload=offload, reason="; ".join(reasons))


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


def plan_device(settings: Settings, free_bytes_fn: FreeBytesFn | None = None) -> LoadPlan:
    """Probe torch for devices and free memory, decide with ``decide_plan``, log it in one line."""
    import torch

    cuda = torch.cuda.is_available()
    mps_backend = getattr(torch.backends, "mps", None)
    mps = bool(mps_backend is not None and mps_backend.is_available())
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    free = (free_bytes_fn or _cuda_free_bytes)() if cuda else None
    plan = decide_plan(
        settings,
        cuda=cuda,
        mps=mps,
        bf16_supported=bf16,
        free_bytes=free,
        weights_bytes=estimate_weights_bytes(settings.model, settings.model_cache_dir),
        preferred=preferred_dtype(settings.model),
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
    started = time.perf_counter()
    try:
        pipe = DiffusionPipeline.from_pretrained(
            source, dtype=torch_dtype(plan.dtype), use_safetensors=True, **extra
        )
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
    _log.info("loaded %s from %s in %.1f s", profile.name, source, time.perf_counter() - started)
    return pipe, profile, plan


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

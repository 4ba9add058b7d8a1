"""Model presets and ``resolve_profile``: from a MODEL setting to the core's ``ModelProfile``."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bot.config import DType
from bot.domain import ModelProfile, StepRounding
from bot.errors import ConfigError
from generation.tiny import TINY_BUILDERS, marker_preset

_log = logging.getLogger(__name__)

TINY = "tiny"
#: the presets built locally rather than downloaded (``tiny`` is Z-Image; SD and SDXL for tests)
TINY_PRESETS = frozenset(TINY_BUILDERS)

#: named shapes offered to users, as width:height ratios
RATIOS: Mapping[str, tuple[int, int]] = {
    "square": (1, 1),
    "portrait": (3, 4),
    "landscape": (4, 3),
    "wide": (16, 9),
}

_Z_IMAGE_MODULE = "diffusers.pipelines.z_image.pipeline_z_image"
_STEPS_FIX_MARKER = "get_default_z_image_sigmas"
# the same rule as huggingface_hub's validate_repo_id, without importing it
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[\w.\-]{1,96}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Preset:
    """A known model: where it lives, its defaults, and what it takes to load it.

    ``repo`` is None for the tiny model, which is built locally. ``weights_bytes`` is the
    size of the weights in ``dtype``, used to decide whether the model fits the GPU.
    """

    name: str
    repo: str | None
    family: str
    width: int
    height: int
    steps: int
    guidance: float
    size_multiple: int
    dtype: DType
    weights_bytes: int
    min_side: int = 64
    max_side: int = 2048
    seconds_per_mpx_step: float = 0.25
    #: the largest component's share of ``weights_bytes``: what model offload keeps on the GPU at once
    largest_share: float = 0.75
    #: how the family's image-to-image pipeline rounds strength × steps; None = it has none
    img2img: StepRounding | None = None


_GB = 1_000_000_000

PRESETS: Mapping[str, Preset] = {
    "z-image-turbo": Preset(
        name="z-image-turbo",
        repo="Tongyi-MAI/Z-Image-Turbo",
        family="z-image",
        width=1024,
        height=1024,
        steps=8,  # replaced by the detected value, see z_image_steps()
        guidance=0.0,
        size_multiple=16,
        dtype=DType.BFLOAT16,
        weights_bytes=int(20.5 * _GB),
        largest_share=0.6,  # the 6B transformer: 12.3 of 20.5 GB
        # about 2.5 s for 8 steps at 1024² on a 24 GB consumer card
        seconds_per_mpx_step=0.3,
        img2img=StepRounding.UP,
    ),
    "sdxl-turbo": Preset(
        name="sdxl-turbo",
        repo="stabilityai/sdxl-turbo",
        family="sdxl",
        width=512,
        height=512,
        # one step is the model card's minimum; four give clearly better detail for little time
        steps=4,
        guidance=0.0,
        size_multiple=8,
        dtype=DType.BFLOAT16,
        weights_bytes=int(7.0 * _GB),
        seconds_per_mpx_step=0.08,
        img2img=StepRounding.DOWN,
    ),
    "sdxl": Preset(
        name="sdxl",
        repo="stabilityai/stable-diffusion-xl-base-1.0",
        family="sdxl",
        width=1024,
        height=1024,
        steps=30,
        guidance=5.0,
        size_multiple=8,
        dtype=DType.BFLOAT16,
        weights_bytes=int(7.0 * _GB),
        seconds_per_mpx_step=0.08,
        img2img=StepRounding.DOWN,
    ),
    TINY: Preset(
        name=TINY,
        repo=None,
        family="z-image",
        width=64,
        height=64,
        steps=8,
        guidance=0.0,
        size_multiple=16,
        dtype=DType.BFLOAT16,
        weights_bytes=2_000_000,
        min_side=16,
        max_side=512,
        # tens of milliseconds for 8 steps at 64² on a CPU
        seconds_per_mpx_step=1.5,
        img2img=StepRounding.UP,
    ),
    # Stable Diffusion and SDXL with random weights, for the image-to-image tests: they draw noise
    "tiny-sd": Preset(
        name="tiny-sd",
        repo=None,
        family="sd",
        width=64,
        height=64,
        steps=8,
        guidance=0.0,
        size_multiple=8,
        dtype=DType.BFLOAT16,
        weights_bytes=1_000_000,
        min_side=16,
        max_side=512,
        seconds_per_mpx_step=1.5,
        img2img=StepRounding.DOWN,
    ),
    "tiny-sdxl": Preset(
        name="tiny-sdxl",
        repo=None,
        family="sdxl",
        width=64,
        height=64,
        steps=8,
        guidance=0.0,
        size_multiple=8,
        dtype=DType.BFLOAT16,
        weights_bytes=1_000_000,
        min_side=16,
        max_side=512,
        seconds_per_mpx_step=1.5,
        img2img=StepRounding.DOWN,
    ),
}

# defaults per pipeline family, for models given by repo id or folder
_FAMILIES: Mapping[str, Preset] = {
    "z-image": dataclasses.replace(PRESETS["z-image-turbo"], name="", repo=None),
    "sdxl": dataclasses.replace(PRESETS["sdxl"], name="", repo=None),
    "sd": Preset(
        name="",
        repo=None,
        family="sd",
        width=512,
        height=512,
        steps=25,
        guidance=7.0,
        size_multiple=8,
        dtype=DType.BFLOAT16,
        weights_bytes=0,  # unknown: measured from the files where they are local
        seconds_per_mpx_step=0.25,
        img2img=StepRounding.DOWN,
    ),
    "generic": Preset(
        name="",
        repo=None,
        family="generic",
        width=512,
        height=512,
        steps=25,
        guidance=7.0,
        size_multiple=8,
        dtype=DType.BFLOAT16,
        weights_bytes=0,  # unknown: measured from the files where they are local
        seconds_per_mpx_step=0.25,
    ),
}

_FAMILY_OF_CLASS: Mapping[str, str] = {
    "ZImagePipeline": "z-image",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionPipeline": "sd",
}


def diffusers_has_steps_fix() -> bool:
    """Whether the installed diffusers has Z-Image's terminal-timestep fix (diffusers ≥ 0.42).

    With the fix ``num_inference_steps=8`` runs the model's 8 forwards; before it, 9 were
    needed for the same result. The fix added ``get_default_z_image_sigmas`` to the pipeline
    module. When the module is already imported its attributes are checked; otherwise its
    source is read rather than imported, so that resolving a profile never drags in torch.
    """
    module = sys.modules.get(_Z_IMAGE_MODULE)
    if module is not None:
        return hasattr(module, _STEPS_FIX_MARKER)
    spec = importlib.util.find_spec("diffusers")
    if spec is None or not spec.submodule_search_locations:
        return False
    for root in spec.submodule_search_locations:
        source = Path(root, "pipelines", "z_image", "pipeline_z_image.py")
        try:
            text = source.read_text(encoding="utf-8")
        except OSError:
            continue
        return f"def {_STEPS_FIX_MARKER}(" in text
    return False


def z_image_steps(diffusers_steps_fix: bool | None = None) -> int:
    """Z-Image-Turbo's default step count for this diffusers: 8 with the fix, 9 before it."""
    fixed = diffusers_has_steps_fix() if diffusers_steps_fix is None else diffusers_steps_fix
    return 8 if fixed else 9


def named_sizes(profile: ModelProfile) -> dict[str, tuple[int, int]]:
    """The named shapes of ``profile``: about its default area, valid multiples, within its sides."""
    sizes: dict[str, tuple[int, int]] = {}
    for label, (rw, rh) in RATIOS.items():
        width, height = profile.size_for_ratio(rw, rh)
        lo, hi, m = profile.min_side, profile.max_side, profile.size_multiple
        # keep every side valid: clamp into [min_side, max_side] on the multiple grid
        width = min(max(width, -(-lo // m) * m), hi // m * m)
        height = min(max(height, -(-lo // m) * m), hi // m * m)
        sizes[label] = (width, height)
    return sizes


def _profile(name: str, preset: Preset, steps: int) -> ModelProfile:
    profile = ModelProfile(
        name=name,
        family=preset.family,
        default_width=preset.width,
        default_height=preset.height,
        default_steps=steps,
        default_guidance=preset.guidance,
        size_multiple=preset.size_multiple,
        min_side=preset.min_side,
        max_side=preset.max_side,
        negative_needs_guidance=True,
        seconds_per_mpx_step=preset.seconds_per_mpx_step,
        img2img=preset.img2img,
    )
    return dataclasses.replace(profile, sizes=named_sizes(profile))


def _read_model_index(folder: Path) -> dict[str, object]:
    index = folder / "model_index.json"
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"MODEL folder {folder} has no model_index.json (not a diffusers pipeline)"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"MODEL folder {folder}: cannot read model_index.json ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"MODEL folder {folder}: model_index.json is not a JSON object")
    return data


def cached_snapshot(repo: str, cache_dir: Path | None) -> Path | None:
    """The folder of hub ``repo``'s cached snapshot if its model_index.json is cached (never downloads).

    ``cache_dir`` None is huggingface_hub's default cache. A string that is not a repo id
    (a path, say) is not in any cache.
    """
    if not _REPO_ID.match(repo):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo, "model_index.json", cache_dir=cache_dir)
    except ValueError:  # huggingface_hub's own repo id check is a little stricter than _REPO_ID
        return None
    return Path(found).parent if isinstance(found, str) else None


def _cached_model_index(repo: str, cache_dir: Path | None) -> dict[str, object] | None:
    """The hub repo's model_index.json if it is already in the local cache (never downloads)."""
    snapshot = cached_snapshot(repo, cache_dir)
    if snapshot is None:
        return None
    try:
        data = json.loads((snapshot / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_local(model: str) -> bool:
    """Whether MODEL names an existing local folder (rather than a preset or a hub repo id)."""
    return model not in PRESETS and Path(model).expanduser().is_dir()


def _looks_like_path(model: str) -> bool:
    """Whether a MODEL that is no repo id was meant as a folder (``/models/x``, ``./x``, ``~/x``)."""
    return "/" in model or "\\" in model or model.startswith(("~", "."))


def repo_for(model: str) -> str:
    """What to pass to ``from_pretrained``: the preset's hub id, or MODEL itself (repo id or folder).

    The ``tiny`` preset has no repo; loading builds it under the model cache and returns
    ``"tiny"`` here.
    """
    preset = PRESETS.get(model)
    if preset is not None:
        return preset.repo or preset.name
    if is_local(model):
        return str(Path(model).expanduser())
    return model


def preferred_dtype(model: str) -> DType:
    """The dtype a model is meant to run in on a GPU (bf16 for every preset)."""
    preset = PRESETS.get(model)
    return preset.dtype if preset is not None else DType.BFLOAT16


def preset_for(model: str, *, cache_dir: Path | None = None) -> Preset:
    """The preset of MODEL, or family defaults guessed from its ``model_index.json``.

    A local folder built by ``build_tiny_pipeline`` counts as the ``tiny`` preset.
    Raises ``ConfigError`` for a string that is neither a preset, a folder nor a repo id.
    """
    preset = PRESETS.get(model)
    if preset is not None:
        return preset
    if is_local(model):
        folder = Path(model).expanduser()
        index = _read_model_index(folder)
        tiny = marker_preset(folder)
        if tiny is not None:
            return PRESETS[tiny]
        name = folder.resolve().name
    elif _REPO_ID.match(model):
        index = _cached_model_index(model, cache_dir) or {}
        name = model
    elif _looks_like_path(model):
        raise ConfigError(f"MODEL folder {model} does not exist (and it is no preset or hub repo id)")
    else:
        known = ", ".join(PRESETS)
        raise ConfigError(
            f"MODEL={model!r} is not a preset ({known}), an existing diffusers folder, or a hub repo id"
        )
    family = _FAMILY_OF_CLASS.get(str(index.get("_class_name", "")), "generic")
    return dataclasses.replace(_FAMILIES[family], name=name, repo=None if is_local(model) else model)


def resolve_profile(
    model: str, *, diffusers_steps_fix: bool | None = None, cache_dir: Path | None = None
) -> ModelProfile:
    """The ``ModelProfile`` of MODEL (a preset name, a hub repo id or a local diffusers folder).

    Z-Image's default steps follow the installed diffusers (see ``z_image_steps``);
    ``diffusers_steps_fix`` overrides the detection. ``cache_dir`` is where hub models are
    cached: a repo id's family is read from its cached ``model_index.json`` when present.
    """
    preset = preset_for(model, cache_dir=cache_dir)
    steps = preset.steps
    if preset.family == "z-image" and preset.name != TINY:
        steps = z_image_steps(diffusers_steps_fix)
    return _profile(preset.name, preset, steps)

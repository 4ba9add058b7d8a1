"""The text command grammar: ``a red fox in snow --ar 16:9 --seed 42 --n 2 --no blurry``.

One parser for Telegram, the console and Discord's free-text prompt option. Every value is
validated against the model profile and the operator's limits; anything outside them is
refused with one line naming the flag, the value and what is allowed. Nothing is clamped.

Drawing from a picture adds ``--strength`` and the sizing rule: without ``--size`` or
``--ar`` the output keeps the picture's aspect ratio at about the model's default pixel
count (the picture is then resized and centre-cropped to that size by the worker).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from bot.domain import DrawRequest, ModelProfile, SourceImage
from bot.errors import RequestError
from bot.words import find_blocked as find_blocked  # re-exported: callers import it from here

if TYPE_CHECKING:
    from bot.config import Settings

MAX_SEED = 2**32 - 1
#: ``--strength``: how far from the picture to go (1 = all the way, almost a new picture)
MIN_STRENGTH = 0.05
MAX_STRENGTH = 1.0
DEFAULT_STRENGTH = 0.6
#: the widest shape drawn, for ``--ar`` and for a picture's own shape
MAX_RATIO = 4

#: flag aliases → canonical name
FLAGS: Mapping[str, str] = {
    "ar": "ar",
    "aspect": "ar",
    "seed": "seed",
    "steps": "steps",
    "n": "n",
    "count": "n",
    "no": "no",
    "neg": "no",
    "cfg": "cfg",
    "guidance": "cfg",
    "size": "size",
    "strength": "strength",
}

# A flag starts with "--" (or the em/en dash phones substitute) after whitespace or at the start.
_FLAG_RE = re.compile(r"(?:(?<=\s)|^)(?:--|—|–)([A-Za-z][A-Za-z0-9_-]*)(?=\s|$)")
_SIZE_RE = re.compile(r"^\s*(\d{1,6})\s*[x×*]\s*(\d{1,6})\s*$", re.IGNORECASE)
_RATIO_RE = re.compile(r"^\s*(\d{1,4})\s*[:/x]\s*(\d{1,4})\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """The operator's limits on one request."""

    max_steps: int = 50
    max_images: int = 4
    max_pixels: int = 2 * 1024 * 1024
    max_prompt_chars: int = 1000
    default_negative_prompt: str = ""
    #: an uploaded picture's limits: its file size and its pixels (checked before decoding)
    max_input_bytes: int = 20 * 1024 * 1024
    max_input_pixels: int = 50_000_000

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_steps=settings.max_steps,
            max_images=settings.max_images,
            max_pixels=settings.max_pixels,
            max_prompt_chars=settings.max_prompt_chars,
            default_negative_prompt=settings.default_negative_prompt,
            max_input_bytes=settings.max_input_bytes,
            max_input_pixels=settings.max_input_pixels,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RawOptions:
    """Options as the user wrote them, before validation (strings, or typed values from a platform UI)."""

    prompt: str
    negative: str | None = None
    size: str | None = None
    ar: str | None = None
    steps: str | int | None = None
    seed: str | int | None = None
    count: str | int | None = None
    guidance: str | float | None = None
    strength: str | float | None = None


def split_flags(text: str) -> RawOptions:
    """Split ``prompt --flag value ...`` into raw options; unknown or repeated flags are refused."""
    parts = _FLAG_RE.split(text)
    prompt = parts[0]
    values: dict[str, str] = {}
    for i in range(1, len(parts), 2):
        name = parts[i]
        canonical = FLAGS.get(name.lower())
        if canonical is None:
            known = ", ".join(f"--{f}" for f in ("ar", "size", "seed", "steps", "n", "cfg", "no", "strength"))
            raise RequestError(f"unknown flag --{name[:30]}: known flags are {known}")
        if canonical in values:
            raise RequestError(f"--{canonical} is given twice")
        values[canonical] = parts[i + 1].strip()
    return RawOptions(
        prompt=prompt,
        negative=values.get("no"),
        size=values.get("size"),
        ar=values.get("ar"),
        steps=values.get("steps"),
        seed=values.get("seed"),
        count=values.get("n"),
        guidance=values.get("cfg"),
        strength=values.get("strength"),
    )


def _show(value: object) -> str:
    """A user's value, safe to echo in a one-line message."""
    text = _clean_text(str(value))
    return text if len(text) <= 30 else text[:27] + "..."


def _int(flag: str, value: str | int, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise RequestError(f"--{flag} must be a whole number from {low} to {high}")
    if isinstance(value, int):
        number = value
    else:
        text = value.strip()
        if not re.fullmatch(r"[+-]?\d{1,12}", text):
            shown = _show(text) or "(empty)"
            raise RequestError(f"--{flag} {shown} is not a whole number: allowed {low}–{high}")
        number = int(text)
    if not low <= number <= high:
        raise RequestError(f"--{flag} {number} is out of range: allowed {low}–{high}")
    return number


def _float(flag: str, value: str | float, low: float, high: float) -> float:
    if isinstance(value, bool):
        raise RequestError(f"--{flag} must be a number from {low:g} to {high:g}")
    if isinstance(value, int | float):
        number = float(value)
    else:
        text = value.strip()
        if not re.fullmatch(r"[+-]?(\d{1,6}(\.\d{0,6})?|\.\d{1,6})", text):
            shown = _show(text) or "(empty)"
            raise RequestError(f"--{flag} {shown} is not a number: allowed {low:g}–{high:g}")
        number = float(text)
    if not math.isfinite(number) or not low <= number <= high:
        raise RequestError(f"--{flag} {number:g} is out of range: allowed {low:g}–{high:g}")
    return number


def _clean_text(text: str) -> str:
    """Drop control characters (keep newlines as spaces) and trim."""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "\n\r\t":
            out.append(" ")
        elif cat in ("Cc", "Cs") or (cat == "Cf" and ch not in "\u200d\u200c"):
            continue
        else:
            out.append(ch)
    return re.sub(r" {2,}", " ", "".join(out)).strip()


def _check_size(
    flag: str, shown: str, width: int, height: int, profile: ModelProfile, limits: Limits
) -> None:
    m = profile.size_multiple
    lo, hi = profile.min_side, profile.max_side
    if width % m or height % m or not (lo <= width <= hi and lo <= height <= hi):
        raise RequestError(
            f"--{flag} {shown} is not allowed: width and height must be multiples of {m} from {lo} to {hi}"
        )
    if width * height > limits.max_pixels:
        raise RequestError(
            f"--{flag} {shown} is too large: at most {limits.max_pixels:,} pixels "
            f"({width}x{height} is {width * height:,})"
        )


def resolve_size(
    profile: ModelProfile,
    limits: Limits,
    size: str | None,
    ar: str | None,
    source: SourceImage | None = None,
) -> tuple[int, int]:
    """Width and height from ``--size`` (WxH or a preset name) or ``--ar`` (W:H), else the default.

    With a ``source`` picture and neither flag: the picture's own shape at about the model's
    default pixel count, in the multiples the model needs.
    """
    if size is not None and ar is not None:
        raise RequestError("use either --size or --ar, not both")
    if size is not None:
        key = size.strip().lower()
        if key in profile.sizes:
            width, height = profile.sizes[key]
        else:
            match = _SIZE_RE.match(size)
            if not match:
                names = ", ".join(profile.sizes) or "none"
                raise RequestError(
                    f"--size {_show(size) or '(empty)'} is not a size: use WxH like 768x1024 or one of {names}"
                )
            width, height = int(match.group(1)), int(match.group(2))
        _check_size("size", _show(size), width, height, profile, limits)
        return width, height
    if ar is not None:
        match = _RATIO_RE.match(ar)
        if not match or int(match.group(1)) == 0 or int(match.group(2)) == 0:
            raise RequestError(
                f"--ar {_show(ar) or '(empty)'} is not an aspect ratio: use W:H with whole numbers, like 16:9"
            )
        rw, rh = int(match.group(1)), int(match.group(2))
        if max(rw / rh, rh / rw) > MAX_RATIO:
            raise RequestError(f"--ar {rw}:{rh} is too extreme: allowed from 1:{MAX_RATIO} to {MAX_RATIO}:1")
        width, height = profile.size_for_ratio(rw, rh)
        _check_size("ar", f"{rw}:{rh}", width, height, profile, limits)
        return width, height
    if source is not None:
        sw, sh = source.width, source.height
        if max(sw / sh, sh / sw) > MAX_RATIO:
            raise RequestError(
                f"the picture is {sw}x{sh}, wider than {MAX_RATIO}:1 or 1:{MAX_RATIO}: "
                "choose a shape with --ar or --size (the picture is centre-cropped to it)"
            )
        width, height = profile.size_for_ratio(sw, sh)
        try:
            _check_size("ar", f"{sw}:{sh}", width, height, profile, limits)
        except RequestError:
            raise RequestError(
                f"the picture's shape ({sw}x{sh}) gives {width}x{height}, outside this model's sizes: "
                "choose one with --ar or --size"
            ) from None
        return width, height
    return profile.default_width, profile.default_height


def build_request(
    options: RawOptions, profile: ModelProfile, limits: Limits, source: SourceImage | None = None
) -> DrawRequest:
    """Validate raw options against the model and the limits; the one place requests are made.

    ``source`` is the kept picture of an image-to-image request (``--strength`` needs one).
    """
    prompt = _clean_text(options.prompt)
    if not prompt:
        raise RequestError("the prompt is empty: try /draw a red fox in snow")
    if len(prompt) > limits.max_prompt_chars:
        raise RequestError(
            f"the prompt has {len(prompt):,} characters; the limit is {limits.max_prompt_chars:,}"
        )
    negative_given = options.negative is not None and _clean_text(options.negative) != ""
    negative = _clean_text(options.negative) if options.negative is not None else ""
    if options.negative is not None and not negative:
        raise RequestError("--no needs text after it, like --no blurry, text")
    if len(negative) > limits.max_prompt_chars:
        raise RequestError(f"--no has {len(negative):,} characters; the limit is {limits.max_prompt_chars:,}")
    width, height = resolve_size(profile, limits, options.size, options.ar, source)
    steps = (
        profile.default_steps if options.steps is None else _int("steps", options.steps, 1, limits.max_steps)
    )
    strength = _strength(options.strength, steps, profile, source)
    count = 1 if options.count is None else _int("n", options.count, 1, limits.max_images)
    seed = None if options.seed is None else _int("seed", options.seed, 0, MAX_SEED)
    guidance = (
        profile.default_guidance
        if options.guidance is None
        else _float("cfg", options.guidance, 0.0, profile.max_guidance)
    )
    notes: list[str] = []
    if negative_given and guidance == 0 and profile.negative_needs_guidance:
        notes.append(
            "the negative prompt has no effect with --cfg 0 on this model; add e.g. --cfg 1.5 to use it "
            "(it doubles the GPU time)"
        )
    if not negative and limits.default_negative_prompt and guidance > 0:
        negative = limits.default_negative_prompt
    return DrawRequest(
        prompt=prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        seed=seed,
        count=count,
        notes=tuple(notes),
        strength=strength,
        source=None if source is None else source.ref,
    )


def check_request(request: DrawRequest, profile: ModelProfile, limits: Limits) -> None:
    """Check a request made earlier (a reroll's, a variation's, a recovered job's) against today's
    model and limits: the operator may have lowered a limit or changed the model since.

    Raises ``RequestError`` naming the first value that no longer fits.
    """
    if len(request.prompt) > limits.max_prompt_chars:
        raise RequestError(
            f"the prompt has {len(request.prompt):,} characters; the limit is {limits.max_prompt_chars:,}"
        )
    if len(request.negative_prompt) > limits.max_prompt_chars:
        raise RequestError(
            f"--no has {len(request.negative_prompt):,} characters; the limit is {limits.max_prompt_chars:,}"
        )
    _check_size("size", f"{request.width}x{request.height}", request.width, request.height, profile, limits)
    _int("steps", request.steps, 1, limits.max_steps)
    _int("n", request.count, 1, limits.max_images)
    _float("cfg", request.guidance, 0.0, profile.max_guidance)
    if request.source is not None or request.strength is not None:
        check_strength(request.strength if request.strength is not None else DEFAULT_STRENGTH,
                       request.steps, profile)  # fmt: skip


def check_strength(value: str | float, steps: int, profile: ModelProfile) -> float:
    """A valid ``--strength`` for ``steps`` on ``profile``: in range, and running at least one step."""
    if profile.img2img is None:
        raise RequestError(f"the model {profile.name} cannot draw from a picture; send /draw without one")
    strength = _float("strength", value, MIN_STRENGTH, MAX_STRENGTH)
    if profile.img2img.steps_run(steps, strength) < 1:
        # SD and SDXL round strength × steps down: 0.1 × 8 would run no step at all
        least = math.ceil(100 / steps) / 100
        raise RequestError(
            f"--strength {strength:g} with {steps} steps runs no denoising step on this model: "
            f"use --strength {least:g} or more, or more --steps"
        )
    return strength


def precheck_picture_request(options: RawOptions, profile: ModelProfile, limits: Limits) -> None:
    """Check all of a request from a picture that does not need the picture, before it is decoded.

    The model must draw from pictures; the prompt and flags must be valid; so must
    ``--strength`` for the steps asked for. Only the sizing from the picture's shape is left.
    """
    if profile.img2img is None:
        raise RequestError(f"the model {profile.name} cannot draw from a picture; send /draw without one")
    request = build_request(replace(options, strength=None), profile, limits)
    if options.strength is not None:
        check_strength(options.strength, request.steps, profile)


def _strength(
    value: str | float | None, steps: int, profile: ModelProfile, source: SourceImage | None
) -> float | None:
    if source is None:
        if value is not None:
            raise RequestError("--strength is for drawing from a picture: attach one or reply to one")
        return None
    return check_strength(DEFAULT_STRENGTH if value is None else value, steps, profile)


def parse_draw(text: str, profile: ModelProfile, limits: Limits) -> DrawRequest:
    """Parse and validate the text after ``/draw``."""
    return build_request(split_flags(text), profile, limits)

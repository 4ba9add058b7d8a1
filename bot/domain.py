"""Platform-neutral values: users, requests, model profiles, jobs, tickets and credits."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bot.errors import RequestError

JsonDict = Mapping[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class UserRef:
    """A user on one platform: ``platform`` is ``telegram``, ``discord`` or ``console``."""

    platform: str
    id: str

    @property
    def key(self) -> str:
        return f"{self.platform}:{self.id}"

    @classmethod
    def parse(cls, text: str) -> UserRef:
        """Parse ``platform:id`` (as written in ``ADMIN_IDS``)."""
        platform, sep, ident = text.strip().partition(":")
        if not sep or not platform or not ident:
            raise RequestError(f"user must look like platform:id, got {text!r}")
        return cls(platform=platform.lower(), id=ident)

    def __str__(self) -> str:
        return self.key


#: the two strengths of the Vary buttons: a close variation and a freer one
VARY_SUBTLE = 0.35
VARY_STRONG = 0.7


class StepRounding(enum.StrEnum):
    """How an image-to-image pipeline turns ``strength × steps`` into the steps it runs.

    Z-Image rounds up (0.6 × 8 runs 5 steps); Stable Diffusion and SDXL round down (4).
    """

    UP = "up"
    DOWN = "down"

    def steps_run(self, steps: int, strength: float) -> int:
        """The denoising steps the pipeline runs: diffusers' own arithmetic, float for float."""
        if self is StepRounding.UP:
            # ZImageImg2ImgPipeline.get_timesteps
            init = min(steps * strength, steps)
            return steps - int(max(steps - init, 0))
        # StableDiffusion(XL)Img2ImgPipeline.get_timesteps
        return steps - max(steps - min(int(steps * strength), steps), 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelProfile:
    """What the core needs to know about a model: defaults, size rules and speed.

    ``seconds_per_mpx_step`` is the estimated GPU time of one denoising step on one
    megapixel; the dispatcher refines it from measured jobs.
    """

    name: str
    family: str
    default_width: int
    default_height: int
    default_steps: int
    default_guidance: float
    size_multiple: int
    min_side: int = 64
    max_side: int = 2048
    max_guidance: float = 20.0
    #: a negative prompt only has an effect when guidance > 0 (Z-Image, SDXL-Turbo)
    negative_needs_guidance: bool = True
    seconds_per_mpx_step: float = 0.25
    #: named sizes: square, portrait, landscape, wide, ...
    sizes: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    #: how its image-to-image pipeline rounds ``strength × steps``; None = it cannot draw from a picture
    img2img: StepRounding | None = None

    @property
    def default_pixels(self) -> int:
        return self.default_width * self.default_height

    def steps_run(self, request: DrawRequest) -> int:
        """The denoising steps ``request`` actually runs: all of them, or its share when it starts from a picture."""
        if request.strength is None:
            return request.steps
        if self.img2img is None:
            raise RequestError(f"the model {self.name} cannot draw from a picture")
        return self.img2img.steps_run(request.steps, request.strength)

    def size_for_ratio(self, rw: int, rh: int) -> tuple[int, int]:
        """Width and height with about the default pixel count in ratio ``rw:rh``.

        Rounds to the nearest multiple of ``size_multiple``: the user asked for a shape,
        not an exact size, and the chosen size is shown back to them.
        """
        area = self.default_pixels
        m = self.size_multiple
        width = math.sqrt(area * rw / rh)
        height = width * rh / rw
        return max(m, round(width / m) * m), max(m, round(height / m) * m)


@dataclass(frozen=True, slots=True, kw_only=True)
class DrawRequest:
    """A validated draw request: every field is within the model's and operator's limits."""

    prompt: str
    negative_prompt: str = ""
    width: int
    height: int
    steps: int
    guidance: float
    seed: int | None = None
    count: int = 1
    #: things the user should be told (e.g. a negative prompt without guidance has no effect)
    notes: tuple[str, ...] = ()
    #: image-to-image: how far from the picture to go (0.05–1), None for text-to-image
    strength: float | None = None
    #: image-to-image: the sha256 of the kept source picture (``OUTPUT_DIR/sources/<sha256>.png``)
    source: str | None = None

    def __post_init__(self) -> None:
        if (self.strength is None) != (self.source is None):
            raise ValueError("strength and source go together: both set (from a picture) or neither")

    @property
    def from_picture(self) -> bool:
        """Whether this request starts from a picture (image-to-image)."""
        return self.source is not None

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1_000_000

    def seeds(self, rand32: int) -> tuple[int, ...]:
        """One seed per image: the given seed counting up, or a random start."""
        start = self.seed if self.seed is not None else rand32
        return tuple((start + i) % 2**32 for i in range(self.count))

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance": self.guidance,
            "seed": self.seed,
            "count": self.count,
            "notes": list(self.notes),
            # only image-to-image rows carry these: text rows stay as they were
            **({"strength": self.strength, "source": self.source} if self.source is not None else {}),
        }

    @classmethod
    def from_json(cls, data: JsonDict) -> DrawRequest:
        return cls(
            prompt=str(data["prompt"]),
            negative_prompt=str(data.get("negative_prompt", "")),
            width=int(data["width"]),
            height=int(data["height"]),
            steps=int(data["steps"]),
            guidance=float(data["guidance"]),
            seed=None if data.get("seed") is None else int(data["seed"]),
            count=int(data.get("count", 1)),
            notes=tuple(data.get("notes", ())),
            strength=None if data.get("strength") is None else float(data["strength"]),
            source=None if data.get("source") is None else str(data["source"]),
        )


def credit_cost(request: DrawRequest, profile: ModelProfile) -> int:
    """Credits for a request: 1 per image at the model's default size and steps, scaled up.

    Proportional to pixels × steps run × images and rounded up (from a picture only
    ``strength × steps`` run, rounded the model's way); never below 1 per image
    (a smaller or shorter image still costs one credit).
    """
    scale = (request.width * request.height * profile.steps_run(request)) / (
        profile.default_pixels * profile.default_steps
    )
    per_image = max(1, math.ceil(scale - 1e-9))
    return per_image * request.count


def gpu_cost(request: DrawRequest, seconds_per_mpx_step: float, profile: ModelProfile | None = None) -> float:
    """Estimated GPU seconds of a request: steps run × megapixels × images × speed, twice with CFG.

    A request from a picture needs the ``profile`` that says how many of its steps run.
    """
    if profile is None and request.from_picture:
        raise ValueError("the cost of a request from a picture depends on the model: pass its profile")
    steps = request.steps if profile is None else profile.steps_run(request)
    passes = 2.0 if request.guidance > 0 else 1.0
    return steps * request.megapixels * request.count * seconds_per_mpx_step * passes


class JobState(enum.StrEnum):
    """Where a job is; the last three are final."""

    QUEUED = "queued"
    RUNNING = "running"
    DELIVERING = "delivering"  # images are saved, delivery pending
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.DELIVERED, JobState.FAILED, JobState.CANCELLED)

    @property
    def cancellable(self) -> bool:
        """Queued or drawing: once the images exist, delivery is no longer cancelled."""
        return self in (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """One request from submit to its final state; a row in the job store.

    ``delivery`` is the adapter's reference to the chat (JSON-able), enough to
    rebuild its reply target after a restart.
    """

    id: str
    user: UserRef
    user_name: str = ""
    request: DrawRequest
    model: str
    credits: int
    gpu_seconds: float
    seeds: tuple[int, ...]
    delivery: JsonDict = field(default_factory=dict)
    state: JobState = JobState.QUEUED
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    outputs: tuple[str, ...] = ()
    #: when True, the credits were not charged (admin or free request)
    free: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceImage:
    """A picture a user gave, checked, decoded and kept: ``ref`` is the sha256 of the kept PNG.

    ``width`` and ``height`` are after EXIF orientation; ``format`` is what was uploaded.
    """

    ref: str
    width: int
    height: int
    format: str  # png | jpeg | webp


@dataclass(frozen=True, slots=True, kw_only=True)
class Ticket:
    """What submit returns: the job, where it stands, what it costs."""

    job: Job
    position: int  # 0 = running next / now
    eta_seconds: float
    credits_cost: int
    credits_left: int | None  # None = unlimited


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    """A running job's progress."""

    step: int
    total: int
    elapsed: float

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class SavedImage:
    """One image written to ``OUTPUT_DIR``; ``photo`` is its chat preview, made in the same pass.

    The PNG at ``path`` is the lossless original with its metadata (files, the "Original"
    button, the outputs folder). ``photo``, where the sink made one, is a high-quality JPEG for
    platforms that recompress photos anyway (Telegram); None after a restart, when only the
    PNG is left.
    """

    path: str
    seed: int
    width: int
    height: int
    size_bytes: int
    photo: UploadFile | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadFile:
    """Bytes ready to upload; ``format`` says whether the PNG was kept or re-encoded."""

    data: bytes
    filename: str
    mime: str
    format: str  # png | jpeg | webp

    @property
    def reencoded(self) -> bool:
        return self.format != "png"


@dataclass(frozen=True, slots=True, kw_only=True)
class UserRecord:
    """A known user as stored."""

    user: UserRef
    display_name: str = ""
    weight: float = 1.0
    banned: bool = False
    allowance: int | None = None  # None = the DAILY_CREDITS default


@dataclass(frozen=True, slots=True, kw_only=True)
class Balance:
    """A user's credits in the current period."""

    period: str
    allowance: int
    used: int  # includes reserved
    bonus: int
    unlimited: bool = False

    @property
    def available(self) -> int:
        return max(0, self.allowance - self.used) + self.bonus


class LedgerKind(enum.StrEnum):
    """Kinds of credit ledger entries."""

    RESERVE = "reserve"
    COMMIT = "commit"
    REFUND = "refund"
    GRANT = "grant"
    SET = "set"
    RESET = "reset"
    BAN = "ban"
    UNBAN = "unban"
    WEIGHT = "weight"


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntry:
    """One append-only ledger row."""

    id: int
    at: float
    user: UserRef
    kind: LedgerKind
    amount: int
    job_id: str | None = None
    actor: str | None = None
    note: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueEntry:
    """A queued or running job with where it stands."""

    job: Job
    position: int  # 0 = next (or running, see ``running``)
    eta_seconds: float
    running: bool = False
    progress: Progress | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueView:
    """A snapshot of the queue: what runs and what waits, in predicted order."""

    entries: tuple[QueueEntry, ...]
    total_queued: int
    users_waiting: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UserView:
    """What an admin sees about a user."""

    record: UserRecord
    balance: Balance
    history: tuple[LedgerEntry, ...]

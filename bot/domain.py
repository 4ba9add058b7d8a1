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

    @property
    def default_pixels(self) -> int:
        return self.default_width * self.default_height

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
        )


def credit_cost(request: DrawRequest, profile: ModelProfile) -> int:
    """Credits for a request: 1 per image at the model's default size and steps, scaled up.

    Proportional to pixels × steps × images and rounded up; never below 1 per image
    (a smaller or shorter image still costs one credit).
    """
    scale = (request.width * request.height * request.steps) / (
        profile.default_pixels * profile.default_steps
    )
    per_image = max(1, math.ceil(scale - 1e-9))
    return per_image * request.count


def gpu_cost(request: DrawRequest, seconds_per_mpx_step: float) -> float:
    """Estimated GPU seconds of a request: steps × megapixels × images × speed, twice with CFG."""
    passes = 2.0 if request.guidance > 0 else 1.0
    return request.steps * request.megapixels * request.count * seconds_per_mpx_step * passes


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
    """One image written to ``OUTPUT_DIR``."""

    path: str
    seed: int
    width: int
    height: int
    size_bytes: int


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

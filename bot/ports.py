"""The ports: small Protocols the core talks through, implemented by the other packages.

* ``Generator``  — a GPU worker (``generation.Worker`` locally).
* ``PoolWorker`` — a Generator that can die and come back (``generation.ray_worker.RayWorker``).
* ``ImageSink``  — saving finished images and fitting them to an upload limit (``generation``).
* ``SourceKeeper`` — decoding and keeping the pictures users draw from (``generation``).
* ``Store``      — users, the credits ledger and the job store (``data.SqliteStore``).
* ``Transport``  — an adapter's outgoing side: sends, edits, uploads within its lanes' budgets.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from bot.budget import Budget
from bot.domain import (
    Balance,
    DrawRequest,
    Job,
    JobState,
    LedgerEntry,
    ModelProfile,
    SavedImage,
    SourceImage,
    UploadFile,
    UserRecord,
    UserRef,
)

#: called on the event loop with (step, total) after every denoising step
StepCallback = Callable[[int, int], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class Rendered:
    """What a generator returns: opaque images (PIL on the local worker) and timings."""

    images: Sequence[Any]
    seeds: tuple[int, ...]
    seconds: float  # GPU wall time of this job
    timings: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Generator(Protocol):
    """A GPU worker. ``generate`` runs one job at a time and may be cancelled.

    ``cancel`` is set from the event loop; the worker checks it every step and raises
    ``CancelledError``. Errors are ``GenerationError`` subclasses; the worker survives them.
    """

    name: str
    profile: ModelProfile

    async def generate(
        self,
        request: DrawRequest,
        seeds: tuple[int, ...],
        *,
        on_step: StepCallback,
        cancel: threading.Event,
    ) -> Rendered: ...


class WorkerState(enum.StrEnum):
    """What a pool worker is doing, as ``/brush stats`` shows it."""

    WARMING = "warming"  # loading or reloading its model; takes no job yet
    IDLE = "idle"
    DRAWING = "drawing"
    DEAD = "dead"  # lost (killed, out of memory, node gone): being restarted
    RETIRED = "retired"  # its model cannot load: it takes no more jobs


@runtime_checkable
class PoolWorker(Generator, Protocol):
    """A Generator in a pool whose members may die and restart (a Ray actor).

    ``ready()`` waits until the worker is warm and returns True, or returns False once the
    worker is retired for good. ``generate`` raises ``WorkerLostError`` when the worker died
    under the job: the job never finished there and may run again elsewhere.
    """

    @property
    def state(self) -> WorkerState: ...

    async def ready(self) -> bool: ...


class ImageSink(Protocol):
    """Saves images with their metadata and fits them to upload limits.

    Both methods are blocking (PNG encoding); the core runs them off the event loop and
    off the GPU thread.
    """

    def save(self, job: Job, rendered: Rendered) -> list[SavedImage]: ...

    def fit(self, path: str, limit_bytes: int) -> UploadFile: ...


class SourceKeeper(Protocol):
    """Decodes a user's picture and keeps it, content-addressed, for the worker to start from.

    Blocking (decoding and PNG encoding): the core runs it off the event loop. ``keep``
    raises ``RequestError`` (one line) for a picture it refuses: not PNG, JPEG or WebP, more
    than ``max_pixels`` pixels in its header (refused before decoding), or unreadable. A
    picture larger than ``keep_pixels`` is kept scaled down to that (no output needs more).
    """

    def keep(self, data: bytes, *, max_pixels: int, keep_pixels: int) -> SourceImage: ...


class LaneKind(enum.StrEnum):
    """What kind of place a lane is; it decides the default budget and whether a board is used."""

    PRIVATE = "private"  # a one-to-one chat
    GROUP = "group"  # a group or channel many people share (a Telegram group, a Discord channel)
    INTERACTION = "interaction"  # one Discord interaction's own webhook (its token's bucket)
    CONSOLE = "console"


@dataclass(frozen=True, slots=True, kw_only=True)
class Lane:
    """Where messages go and which allowance they share: a chat, or a Discord interaction token.

    ``board`` says that a live queue board may stand in for per-job status messages here
    when the lane is busy (a Telegram group); ``key`` is unique across platforms. ``group``
    names the place several lanes share (a Discord channel, where each interaction is a lane of
    its own): while another job of the group is unfinished, a job there gets no status
    message of its own (its acknowledgement is the platform's, e.g. Discord's deferred
    response) and progress thins out, so the place costs about one message per image.
    """

    key: str
    kind: LaneKind
    board: bool = False
    group: str | None = None


class Phase(enum.StrEnum):
    """What a job's own status message shows."""

    QUEUED = "queued"
    DRAWING = "drawing"


class Transport(Protocol):
    """An adapter's outgoing side: it carries the core's texts and images, and knows its budgets.

    The core decides *what* is said and *when* (within each lane's budget, results first);
    the transport decides *how* on its platform. Every method may raise ``DeliveryError``
    (retried), ``UnreachableError`` (the chat is gone) or ``RateLimitedError`` (honoured and
    retried). A job's message ids live in ``job.delivery``, kept up to date by the transport
    through ``Service.update_delivery``, so everything works after a restart.
    """

    platform: str

    def lane(self, delivery: Mapping[str, Any]) -> Lane:
        """The lane a job (or a command's answer) with this delivery reference goes to."""
        ...

    def budget(self, lane: Lane) -> Budget:
        """A new budget for a lane (called once per lane; the core keeps it)."""
        ...

    def result_cost(self, job: Job, images: Sequence[SavedImage]) -> int:
        """Messages the result of ``job`` counts against its lane's budget."""
        ...

    async def status(self, job: Job, text: str, phase: Phase) -> None:
        """Post the job's own status message, or edit it (with a Cancel button)."""
        ...

    async def result(self, job: Job, images: Sequence[SavedImage], caption: str) -> None:
        """Deliver the images as a reply to the request; the status message gives way to them."""
        ...

    async def notice(self, job: Job, text: str) -> None:
        """Tell the requester how the job ended (failure, cancel): the status becomes the line, or a reply."""
        ...

    async def say(self, delivery: Mapping[str, Any], text: str) -> None:
        """Answer a command in the chat of ``delivery`` (a reply to the command)."""
        ...

    async def board(self, lane: Lane, text: str | None) -> None:
        """Post or edit the lane's queue board; ``None`` removes it."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class CreditPolicy:
    """How credits refill: the default allowance and the current period's key."""

    allowance: int
    period: str


class Store(Protocol):
    """Users, credits and jobs, each change atomic (one SQLite transaction)."""

    # users
    async def touch_user(self, user: UserRef, display_name: str = "") -> UserRecord: ...

    async def get_user(self, user: UserRef) -> UserRecord | None: ...

    async def find_user(self, platform: str, name: str) -> UserRecord | None: ...

    # credits
    async def balance(self, user: UserRef, policy: CreditPolicy) -> Balance: ...

    async def grant(self, user: UserRef, amount: int, *, actor: str, policy: CreditPolicy) -> Balance: ...

    async def set_allowance(
        self, user: UserRef, amount: int | None, *, actor: str, policy: CreditPolicy
    ) -> Balance: ...

    async def reset(self, user: UserRef, *, actor: str, policy: CreditPolicy) -> Balance: ...

    async def set_banned(self, user: UserRef, banned: bool, *, actor: str) -> UserRecord: ...

    async def set_weight(self, user: UserRef, weight: float, *, actor: str) -> UserRecord: ...

    async def history(self, user: UserRef, limit: int = 20) -> list[LedgerEntry]: ...

    # jobs
    async def add_job(self, job: Job, *, policy: CreditPolicy | None) -> Balance | None:
        """Insert the job and reserve its credits in one transaction.

        ``policy=None`` means free (admin): nothing is reserved and None is returned.
        Raises ``NoCreditsError`` (and inserts nothing) when the balance is too low.
        """
        ...

    async def mark_running(self, job_id: str, *, at: float) -> None: ...

    async def mark_generated(self, job_id: str, outputs: Sequence[str]) -> None: ...

    async def finish_job(
        self, job_id: str, state: JobState, *, at: float, error: str | None = None, untold: bool = False
    ) -> bool:
        """Move a job to a final state; commit its credits if DELIVERED, refund otherwise.

        ``untold``: its requester is still to be told how it ended (``mark_told`` once they were).
        Idempotent: returns False (and changes nothing) when the job was already final.
        """
        ...

    async def mark_told(self, job_id: str) -> None:
        """The requester of an ended job was told (or cannot be): nothing is owed after a restart."""
        ...

    async def untold_jobs(self) -> list[Job]:
        """Ended jobs whose requester was never told how (a crash came first), in submit order."""
        ...

    async def update_delivery(self, job_id: str, delivery: dict[str, Any]) -> None: ...

    async def get_job(self, job_id: str) -> Job | None: ...

    async def unfinished_jobs(self) -> list[Job]: ...

    async def user_jobs(self, user: UserRef, limit: int = 10) -> list[Job]: ...

    async def job_stats(self) -> dict[str, Any]: ...

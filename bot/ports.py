"""The ports: small Protocols the core talks through, implemented by the other packages.

* ``Generator``  — a GPU worker (``generation.Worker`` locally; later a pool member).
* ``ImageSink``  — saving finished images and fitting them to an upload limit (``generation``).
* ``SourceKeeper`` — decoding and keeping the pictures users draw from (``generation``).
* ``Store``      — users, the credits ledger and the job store (``data.SqliteStore``).
* ``Reply``      — how a job talks back to its chat (one per adapter).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from bot.domain import (
    Balance,
    DrawRequest,
    Job,
    JobState,
    LedgerEntry,
    ModelProfile,
    Progress,
    SavedImage,
    SourceImage,
    Ticket,
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


class Reply(Protocol):
    """How a job talks back to the chat it came from. Built by an adapter from ``job.delivery``.

    ``delivered`` raises ``DeliveryError`` to be retried later, or ``UnreachableError``
    when the chat is gone (the job then fails with a refund).
    """

    async def queued(self, job: Job, ticket: Ticket) -> None: ...

    async def progress(self, job: Job, progress: Progress) -> None: ...

    async def delivered(self, job: Job, images: Sequence[SavedImage]) -> None: ...

    async def failed(self, job: Job, message: str) -> None: ...


#: an adapter's factory: rebuild the reply target of a job from its stored delivery reference
ReplyFactory = Callable[[Job], Reply]


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

    async def finish_job(self, job_id: str, state: JobState, *, at: float, error: str | None = None) -> bool:
        """Move a job to a final state; commit its credits if DELIVERED, refund otherwise.

        Idempotent: returns False (and changes nothing) when the job was already final.
        """
        ...

    async def update_delivery(self, job_id: str, delivery: dict[str, Any]) -> None: ...

    async def get_job(self, job_id: str) -> Job | None: ...

    async def unfinished_jobs(self) -> list[Job]: ...

    async def user_jobs(self, user: UserRef, limit: int = 10) -> list[Job]: ...

    async def job_stats(self) -> dict[str, Any]: ...

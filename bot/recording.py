"""A Reply that records every call, for tests and benchmarks (the record-and-assert fake)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.domain import Job, Progress, SavedImage, Ticket
from bot.errors import DeliveryError, UnreachableError


@dataclass(slots=True)
class ReplyEvent:
    """One recorded call: ``kind`` is queued, progress, delivered or failed; ``at`` when (``perf_counter``)."""

    kind: str
    job_id: str
    data: Any = None
    at: float = field(default_factory=time.perf_counter, compare=False)


@dataclass(slots=True)
class RecordingHub:
    """Shared record of every job's reply calls; ``factory`` is what the service registers.

    ``fail_deliveries[job_id] = n`` makes the next n deliveries raise ``DeliveryError``;
    ``unreachable`` holds job ids whose chat is gone.
    """

    events: list[ReplyEvent] = field(default_factory=list)
    fail_deliveries: dict[str, int] = field(default_factory=dict)
    unreachable: set[str] = field(default_factory=set)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def factory(self, job: Job) -> RecordingReply:
        return RecordingReply(self)

    def record(self, event: ReplyEvent) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, job_id: str, kind: str | None = None) -> list[ReplyEvent]:
        return [e for e in self.events if e.job_id == job_id and (kind is None or e.kind == kind)]

    def finished(self, kind: str = "delivered") -> list[str]:
        return [e.job_id for e in self.events if e.kind == kind]

    async def wait_for(self, predicate: Any, seconds: float = 30.0) -> None:
        """Wait until ``predicate(self)`` is true (re-checked after every recorded event)."""
        async with asyncio.timeout(seconds):
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()


class RecordingReply:
    """The per-job reply target handed to the service."""

    def __init__(self, hub: RecordingHub) -> None:
        self._hub = hub

    async def queued(self, job: Job, ticket: Ticket) -> None:
        self._hub.record(ReplyEvent("queued", job.id, ticket))

    async def progress(self, job: Job, progress: Progress) -> None:
        self._hub.record(ReplyEvent("progress", job.id, progress))

    async def delivered(self, job: Job, images: Sequence[SavedImage]) -> None:
        if job.id in self._hub.unreachable:
            raise UnreachableError("the chat is gone")
        left = self._hub.fail_deliveries.get(job.id, 0)
        if left:
            self._hub.fail_deliveries[job.id] = left - 1
            self._hub.record(ReplyEvent("delivery-error", job.id))
            raise DeliveryError("injected delivery failure")
        self._hub.record(ReplyEvent("delivered", job.id, list(images)))

    async def failed(self, job: Job, message: str) -> None:
        self._hub.record(ReplyEvent("failed", job.id, message))

"""A Transport that records every call, for tests and benchmarks (the record-and-assert fake)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.budget import Budget, Unlimited
from bot.domain import Job, SavedImage
from bot.errors import DeliveryError, UnreachableError
from bot.ports import Lane, LaneKind, Phase


@dataclass(slots=True)
class ReplyEvent:
    """One recorded call; ``at`` when (``perf_counter``).

    ``kind`` is queued or progress (the job's status), delivered, failed (its end), said (an
    answer to a command), board, or delivery-error (an injected failure).
    """

    kind: str
    job_id: str
    data: Any = None
    at: float = field(default_factory=time.perf_counter, compare=False)


@dataclass(slots=True)
class RecordingHub:
    """The transport of a test platform: records what the core sends, in every lane.

    ``fail_deliveries[job_id] = n`` makes the next n deliveries raise ``DeliveryError``;
    ``unreachable`` holds job ids whose chat is gone. ``budget_factory`` gives each lane its
    budget (unlimited by default); ``delivery["chat"]`` names the lane,
    ``delivery["group"]`` makes it a group with a board, and ``delivery["place"]`` puts the
    lane in a lane group (as Discord's interactions share a channel).
    """

    platform: str = "test"
    events: list[ReplyEvent] = field(default_factory=list)
    fail_deliveries: dict[str, int] = field(default_factory=dict)
    unreachable: set[str] = field(default_factory=set)
    budget_factory: Any = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

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

    # ------------------------------------------------------------------ the Transport port

    def lane(self, delivery: Mapping[str, Any]) -> Lane:
        group = bool(delivery.get("group"))
        return Lane(
            key=f"{self.platform}:{delivery.get('chat', '')}",
            kind=LaneKind.GROUP if group else LaneKind.PRIVATE,
            board=group,
            group=str(delivery["place"]) if delivery.get("place") else None,
        )

    def budget(self, lane: Lane) -> Budget:
        return self.budget_factory(lane) if self.budget_factory is not None else Unlimited()

    def result_cost(self, job: Job, images: Sequence[SavedImage]) -> int:
        return max(1, len(images))

    async def status(self, job: Job, text: str, phase: Phase) -> None:
        self.record(ReplyEvent("queued" if phase is Phase.QUEUED else "progress", job.id, text))

    async def result(self, job: Job, images: Sequence[SavedImage], caption: str) -> None:
        if job.id in self.unreachable:
            raise UnreachableError("the chat is gone")
        left = self.fail_deliveries.get(job.id, 0)
        if left:
            self.fail_deliveries[job.id] = left - 1
            self.record(ReplyEvent("delivery-error", job.id))
            raise DeliveryError("injected delivery failure")
        self.record(ReplyEvent("delivered", job.id, list(images)))

    async def notice(self, job: Job, text: str) -> None:
        self.record(ReplyEvent("failed", job.id, text))

    async def say(self, delivery: Mapping[str, Any], text: str) -> None:
        self.record(ReplyEvent("said", str(delivery.get("chat", "")), text))

    async def board(self, lane: Lane, text: str | None) -> None:
        self.record(ReplyEvent("board", lane.key, text))

"""The message budgets and the status engine: windows, learned buckets, priorities, folding, boards."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from typing import Any

import pytest

from bot.budget import LearnedBucket, SlidingWindow, Unlimited
from bot.domain import DrawRequest, Job, Progress, SavedImage, Ticket, UserRef
from bot.errors import RateLimitedError
from bot.ports import Lane, Phase
from bot.recording import RecordingHub, ReplyEvent
from bot.status import StatusEngine

# ---------------------------------------------------------------------------------- budgets


def test_a_sliding_window_counts_slots_from_when_the_call_returned() -> None:
    window = SlidingWindow(3, 10.0)
    assert window.free(0.0) == 3 and window.wait(3, 0.0) == 0
    first = window.spend(2, 0.0)
    assert window.free(0.0) == 1  # in flight counts
    first.settle(1.0)  # the upload took a second: the slots are stamped at 1.0
    window.spend(1, 2.0).settle(2.0)
    assert window.free(5.0) == 0
    assert window.wait(1, 5.0) == pytest.approx(6.0)  # the two slots of 1.0 leave at 11.0
    assert window.wait(3, 5.0) == pytest.approx(7.0)  # all three are free at 12.0
    assert window.free(11.0) == 2 and window.free(12.0) == 3


def test_a_cost_over_the_limit_waits_for_a_clear_window() -> None:
    window = SlidingWindow(2, 1.0)
    window.spend(1, 0.0).settle(0.0)
    assert window.wait(5, 0.5) == pytest.approx(0.5)
    window.spend(5, 1.0).settle(1.0)
    assert window.free(1.5) < 0 and window.wait(1, 1.5) == pytest.approx(0.5)


def test_a_retry_after_blocks_every_budget() -> None:
    for budget in (SlidingWindow(20, 60.0), LearnedBucket(5, 5.0), Unlimited()):
        budget.block(3.0, 10.0)
        assert budget.free(11.0) == 0 and budget.wait(1, 11.0) == pytest.approx(2.0)
        assert budget.wait(1, 13.0) == 0


def test_a_learned_bucket_follows_the_headers() -> None:
    bucket = LearnedBucket(5, 5.0)
    assert bucket.free(0.0) == 5
    bucket.spend(1, 0.0).settle(0.0)
    assert bucket.free(0.0) == 4
    bucket.observe(limit=2, remaining=0, reset_after=1.5, now=0.1)  # the platform knows better
    assert bucket.limit == 2 and bucket.free(0.5) == 0
    assert bucket.wait(1, 0.5) == pytest.approx(1.1)
    assert bucket.free(1.6) == 2  # reset: the learned limit


# ---------------------------------------------------------------------------------- the engine

ALICE = UserRef(platform="test", id="alice")


def job(n: int, *, chat: str = "c", group: bool = False, count: int = 1) -> Job:
    request = DrawRequest(prompt=f"prompt {n}", width=64, height=64, steps=4, guidance=0.0, count=count)
    return Job(
        id=f"job{n}", user=UserRef(platform="test", id=f"u{n}"), user_name=f"user{n}", request=request,
        model="m", credits=1, gpu_seconds=1.0, seeds=tuple(range(count)),
        delivery={"chat": chat, "group": group}, created_at=0.0,
    )  # fmt: skip


def ticket(j: Job) -> Ticket:
    return Ticket(job=j, position=0, eta_seconds=0.0, credits_cost=1, credits_left=5)


def image() -> SavedImage:
    return SavedImage(path="x.png", seed=0, width=64, height=64, size_bytes=10)


def engine(hub: RecordingHub, **kw: Any) -> StatusEngine:
    status = StatusEngine(progress_interval=0.0, group_progress_interval=0.0, board_interval=0.0, **kw)
    status.register(hub)
    return status


async def test_results_go_first_when_the_budget_is_tight() -> None:
    hub = RecordingHub(budget_factory=lambda lane: SlidingWindow(1, 0.05))
    status = engine(hub)
    a, b = job(1), job(2)
    status.queued(a, ticket(a))  # takes the only slot at once
    await status.flushed()
    status.queued(b, ticket(b))  # waits
    status.say("test", {"chat": "c"}, "an answer")  # waits, ahead of b's acknowledgement
    await status.deliver(a, [image()], lambda j: "caption")
    await status.flushed()
    assert [e.kind for e in hub.events] == ["queued", "delivered", "said", "queued"]
    await status.close()


async def test_progress_is_folded_and_never_follows_the_result() -> None:
    hub = RecordingHub(budget_factory=lambda lane: SlidingWindow(1, 0.05))
    status = engine(hub)
    a = job(1)
    status.queued(a, ticket(a))
    await status.flushed()
    status.started(a)
    for step in range(1, 4):
        status.progress(a, Progress(step=step, total=10, elapsed=0.0))
    await status.deliver(a, [image()], lambda j: "caption")
    await asyncio.sleep(0.2)
    kinds = [e.kind for e in hub.events]
    assert kinds[0] == "queued" and kinds[-1] == "delivered"
    assert kinds.count("progress") <= 1  # three steps folded into the newest (or dropped for the result)
    await status.close()


async def test_a_busy_group_gets_a_board_instead_of_status_messages() -> None:
    hub = RecordingHub(budget_factory=lambda lane: SlidingWindow(20, 60.0))
    status = engine(hub)
    jobs = [job(n, chat="g", group=True) for n in range(5)]
    for j in jobs:
        status.queued(j, ticket(j))
    await status.flushed()
    assert [e.job_id for e in hub.events if e.kind == "queued"] == ["job0"]  # the first found it quiet
    boards = [e for e in hub.events if e.kind == "board"]
    assert boards and "user4" in boards[-1].data and "5 job(s)" in boards[-1].data
    for j in jobs:
        await status.deliver(j, [image()], lambda j: "caption")
        status.ended(j.id)
    await asyncio.sleep(0.05)
    assert hub.events[-1].kind == "board" and hub.events[-1].data is None  # removed when the chat is done
    await status.close()


async def test_lanes_of_a_busy_place_skip_their_status_and_have_no_board() -> None:
    hub = RecordingHub()
    status = engine(hub)
    jobs = [job(n, chat=f"it{n}") for n in range(4)]
    for j in jobs:
        j.delivery["place"] = "channel"  # each job its own lane (an interaction), one shared channel
        status.queued(j, ticket(j))
    await status.flushed()
    assert [e.job_id for e in hub.events] == ["job0"]  # the first found the channel quiet; no board
    for j in jobs[1:]:
        status.started(j)
        status.progress(j, Progress(step=1, total=10, elapsed=0.0))
    await asyncio.sleep(0.05)
    assert [e.kind for e in hub.events] == ["queued"]  # no progress for jobs without a status
    for j in jobs:
        await status.deliver(j, [image()], lambda j: "caption")
        status.ended(j.id)
    later = job(9, chat="it9")
    later.delivery["place"] = "channel"
    status.queued(later, ticket(later))  # the channel is quiet again
    await status.flushed()
    assert hub.of("job9", "queued")
    await status.close()


async def test_a_job_whose_lane_changed_gets_no_progress_after_its_result() -> None:
    hub = RecordingHub(budget_factory=lambda lane: SlidingWindow(2, 0.3))
    status = engine(hub)
    a = job(1, chat="interaction")
    status.queued(a, ticket(a))
    await status.flushed()
    status.started(a)
    status.progress(a, Progress(step=1, total=10, elapsed=0.0))  # waits for slack in the first lane
    moved = replace(a, delivery={"chat": "channel"})  # e.g. a Discord token ran out: the channel now
    await status.deliver(moved, [image()], lambda j: "caption")
    await asyncio.sleep(0.5)
    kinds = [e.kind for e in hub.events]
    assert kinds[-1] == "delivered" and "progress" not in kinds[kinds.index("delivered") :]
    await status.close()


async def test_updates_wait_for_slack_beyond_the_results_owed() -> None:
    hub = RecordingHub(budget_factory=lambda lane: SlidingWindow(4, 60.0))
    status = engine(hub)
    jobs = [job(n, chat="g", group=True) for n in range(3)]
    for j in jobs:
        status.queued(j, ticket(j))  # job0's status, then the board
    await status.flushed()
    status.started(jobs[0])
    status.progress(jobs[0], Progress(step=1, total=10, elapsed=0.0))  # 2 free, 3 results owed: waits
    await asyncio.sleep(0.1)
    assert [e.kind for e in hub.events].count("progress") == 0
    await status.close()


async def test_a_rate_limit_is_waited_out_and_the_message_sent_again() -> None:
    class Grumpy(RecordingHub):
        refusals: int = 0

        async def result(self, job: Job, images: Any, caption: str) -> None:
            if not self.events:
                self.record(ReplyEvent("refused", job.id))
                raise RateLimitedError(0.05)
            await super().result(job, images, caption)

    hub = Grumpy()
    status = engine(hub)
    a = job(1)
    await status.deliver(a, [image()], lambda j: "caption")
    assert [e.kind for e in hub.events] == ["refused", "delivered"]
    await status.close()


def test_lanes_are_keyed_by_platform_and_chat() -> None:
    hub = RecordingHub()
    assert hub.lane({"chat": "x"}) == Lane(key="test:x", kind=hub.lane({"chat": "x"}).kind)
    assert hub.lane({"chat": "g", "group": True}).board
    assert math.isfinite(SlidingWindow(1, 1.0).period)
    assert Phase.QUEUED != Phase.DRAWING

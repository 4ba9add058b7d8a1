"""The core service on a real SQLite file: credits, fairness, cancel, failures, recovery, admin."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bot.config import Settings
from bot.domain import JobState, UserRef
from bot.errors import (
    BannedError,
    NoCreditsError,
    NotAuthorizedError,
    OutOfMemoryError,
    QueueFullError,
    RequestError,
)
from bot.recording import RecordingHub, ReplyEvent
from bot.service import Service
from data import SqliteStore
from generation.images import ImageStore
from generation.sources import SourceStore
from tests.support import ScriptedGenerator

ALICE = UserRef(platform="test", id="alice")
BOB = UserRef(platform="test", id="bob")
CAROL = UserRef(platform="test", id="carol")
ADMIN = UserRef(platform="test", id="admin")


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model": "scripted",
        "db_path": tmp_path / "bot.sqlite3",
        "output_dir": tmp_path / "out",
        "admin_ids": "test:admin",
        "daily_credits": 10,
        "max_queued_per_user": 5,
        "max_queued_total": 50,
        "progress_interval": 0.1,
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)


class Harness:
    """A service with a scripted generator, a real store and real image saving."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        self.settings = make_settings(tmp_path, **overrides)
        self.hub = RecordingHub()
        self.gen: Any = ScriptedGenerator()
        self.sink: Any = None  # None: a real ImageStore in the output folder
        self.store_options: dict[str, Any] = {}

    async def open(self) -> Service:
        self.store = SqliteStore(self.settings.db_path, **self.store_options)
        await self.store.start()
        self.service = Service(
            settings=self.settings,
            store=self.store,
            workers=[self.gen],
            sink=self.sink or ImageStore(self.settings.output_dir, self.gen.profile.name),
            delivery_backoff=(0.01, 0.01, 0.01),
            sources=SourceStore(self.settings.output_dir),
        )
        self.service.register(self.hub)
        await self.service.start()
        await self.service.recover()
        return self.service

    async def close(self) -> None:
        await self.service.close()
        await self.store.close()

    async def draw(self, user: UserRef, text: str = "a fox", **kw: Any):  # type: ignore[no-untyped-def]
        return await self.service.submit(user, self.service.parse(text), delivery={"chat": user.id}, **kw)

    async def until(self, predicate: Callable[[RecordingHub], bool]) -> None:
        await self.hub.wait_for(predicate, 20)

    async def settled(self) -> None:
        """Every job has reached its final state in the store."""
        async with asyncio.timeout(20):
            await self.service.wait_idle()


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path)
    await harness.open()
    yield harness
    await harness.close()


def ledger(db: Path) -> list[tuple[str, str, int, str | None]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT user_id, kind, amount, job_id FROM ledger ORDER BY id").fetchall()


async def test_submit_runs_saves_and_commits(h: Harness) -> None:
    ticket = await h.draw(ALICE, "a red fox --n 2 --seed 5")
    assert ticket.credits_cost == 2 and ticket.credits_left == 8
    await h.until(lambda hub: ticket.job.id in hub.finished())
    await h.settled()
    job = await h.store.get_job(ticket.job.id)
    assert job is not None and job.state is JobState.DELIVERED
    assert job.seeds == (5, 6) and len(job.outputs) == 2 and all(Path(p).exists() for p in job.outputs)
    kinds = [e.kind for e in h.hub.of(job.id)]
    assert kinds[0] == "queued" and kinds[-1] == "delivered" and "progress" in kinds
    rows = ledger(h.settings.db_path)
    assert [(r[1], r[2]) for r in rows] == [("reserve", -2), ("commit", 0)]
    assert (await h.service.credits(ALICE)).available == 8


async def test_cost_is_shown_and_scales_with_size_and_steps(h: Harness) -> None:
    assert h.service.cost(h.service.parse("x")) == 1
    assert h.service.cost(h.service.parse("x --steps 8")) == 2
    assert h.service.cost(h.service.parse("x --size 128x128 --n 2")) == 8
    assert h.service.cost(h.service.parse("x --size 32x32")) == 1  # smaller never costs less than 1


async def test_no_credits_gives_a_clear_message_and_no_job(h: Harness) -> None:
    with pytest.raises(NoCreditsError, match="this needs 40, you have 10"):
        await h.draw(ALICE, "x --size 128x128 --steps 40 --n 1")
    assert await h.store.user_jobs(ALICE) == []
    assert ledger(h.settings.db_path) == []


async def test_concurrent_submits_accept_exactly_the_credits(tmp_path: Path) -> None:
    harness = Harness(tmp_path, daily_credits=5, max_queued_per_user=200, max_queued_total=500)
    harness.gen.hold = True
    await harness.open()
    try:
        results = await asyncio.gather(*(harness.draw(ALICE) for _ in range(100)), return_exceptions=True)
        accepted = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, NoCreditsError)]
        assert len(accepted) == 5 and len(refused) == 95
        assert [r[1] for r in ledger(harness.settings.db_path)] == ["reserve"] * 5
    finally:
        harness.gen.release()
        await harness.close()


async def test_queue_limits_name_the_limit(tmp_path: Path) -> None:
    harness = Harness(tmp_path, max_queued_per_user=2, max_queued_total=3)
    harness.gen.hold = True
    await harness.open()
    try:
        await harness.draw(ALICE)
        await harness.gen.started.wait()
        await harness.draw(ALICE)
        with pytest.raises(QueueFullError, match=r"limit 2"):
            await harness.draw(ALICE)
        await harness.draw(BOB)
        await harness.draw(CAROL)
        with pytest.raises(QueueFullError, match=r"queue is full \(3 jobs\)"):
            await harness.draw(CAROL)
    finally:
        harness.gen.hold = False
        harness.gen.release()
        await harness.close()


async def test_two_users_interleave_fairly(h: Harness) -> None:
    h.gen.hold = True
    first = await h.draw(ALICE, "alice 0")
    await h.gen.started.wait()
    for i in range(1, 4):
        await h.draw(ALICE, f"alice {i}")
    for i in range(3):
        await h.draw(BOB, f"bob {i}")
    h.gen.hold = False
    h.gen.release()
    await h.until(lambda hub: len(hub.finished()) == 7)
    order = [prompt for prompt, _ in h.gen.runs]
    assert order[0] == "alice 0" and first.position == 0
    # Bob's first job runs right after the running one; then they alternate.
    assert order[1:] == ["bob 0", "alice 1", "bob 1", "alice 2", "bob 2", "alice 3"]


async def test_banned_user_is_refused_and_unbanned_again(h: Harness) -> None:
    await h.service.admin_ban(ADMIN, BOB)
    with pytest.raises(BannedError):
        await h.draw(BOB)
    await h.service.admin_ban(ADMIN, BOB, banned=False)
    await h.draw(BOB)


async def test_blocked_and_nsfw_words(tmp_path: Path) -> None:
    harness = Harness(tmp_path, blocked_words="gore", nsfw_words="nude")
    await harness.open()
    try:
        with pytest.raises(RequestError, match="blocked word"):
            await harness.draw(ALICE, "some Gore here")
        with pytest.raises(RequestError, match="NSFW"):
            await harness.draw(ALICE, "a nude statue", nsfw_allowed=False)
        await harness.draw(ALICE, "a nude statue", nsfw_allowed=True)
        assert len(await harness.store.user_jobs(ALICE)) == 1
    finally:
        await harness.close()


async def test_cancel_queued_and_running_refunds(h: Harness) -> None:
    h.gen.hold = True
    running = await h.draw(ALICE, "one")
    await h.gen.started.wait()
    queued = await h.draw(ALICE, "two")
    with pytest.raises(NotAuthorizedError):
        await h.service.cancel(BOB, queued.job.id)
    await h.service.cancel(ALICE, queued.job.id)
    await h.service.cancel(ADMIN, running.job.id)  # admins may cancel anyone's job
    await h.until(lambda hub: len(hub.finished("failed")) == 2)
    await h.settled()
    for ticket in (running, queued):
        job = await h.store.get_job(ticket.job.id)
        assert job is not None and job.state is JobState.CANCELLED
    assert (await h.service.credits(ALICE)).available == 10
    kinds = [(r[1], r[2]) for r in ledger(h.settings.db_path)]
    assert sorted(kinds) == sorted([("reserve", -1), ("reserve", -1), ("refund", 1), ("refund", 1)])
    assert "refunded" in h.hub.of(running.job.id, "failed")[0].data
    with pytest.raises(RequestError, match="already finished"):
        await h.service.cancel(ALICE, queued.job.id)


async def test_out_of_memory_fails_one_job_refunds_and_goes_on(h: Harness) -> None:
    h.gen.errors.append(OutOfMemoryError("the GPU ran out of memory for this size; try a smaller --size"))
    bad = await h.draw(ALICE, "big")
    good = await h.draw(ALICE, "small")
    await h.until(lambda hub: good.job.id in hub.finished())
    await h.settled()
    job = await h.store.get_job(bad.job.id)
    assert job is not None and job.state is JobState.FAILED and "out of memory" in (job.error or "")
    assert "refunded" in h.hub.of(bad.job.id, "failed")[0].data
    assert (await h.service.credits(ALICE)).available == 9


async def test_failed_delivery_is_retried_then_unreachable_refunds(h: Harness) -> None:
    h.service.register(h.hub)
    first = await h.draw(ALICE, "retry me")
    h.hub.fail_deliveries[first.job.id] = 2
    second = await h.draw(BOB, "gone")
    h.hub.unreachable.add(second.job.id)
    await h.until(lambda hub: first.job.id in hub.finished())
    assert len(h.hub.of(first.job.id, "delivery-error")) == 2
    await h.settled()
    job = await h.store.get_job(second.job.id)
    assert job is not None and job.state is JobState.FAILED
    assert (await h.service.credits(BOB)).available == 10


async def test_restart_recovers_everything_exactly_once(tmp_path: Path) -> None:
    one = Harness(tmp_path)
    one.gen.hold = True
    await one.open()
    tickets = [await one.draw(ALICE, "a0")]
    await one.gen.started.wait()  # a0 is running, held
    tickets += [await one.draw(BOB, "b0"), await one.draw(ALICE, "a1"), await one.draw(CAROL, "c0")]
    await one.close()  # stops like a crash would leave it: one running, three queued
    states = {(await one_store_job(tmp_path, t.job.id)) for t in tickets}
    assert states == {"running", "queued"}

    two = Harness(tmp_path)
    await two.open()
    try:
        await two.until(lambda hub: len(hub.finished()) == 4)
        await two.settled()
        assert sorted(two.hub.finished()) == sorted(t.job.id for t in tickets)
        assert [p for p, _ in two.gen.runs] == ["a0", "b0", "c0", "a1"]
        for t in tickets:
            job = await two.store.get_job(t.job.id)
            assert job is not None and job.state is JobState.DELIVERED and job.seeds == t.job.seeds
        rows = ledger(two.settings.db_path)
        assert sorted(r[1] for r in rows) == ["commit"] * 4 + ["reserve"] * 4
    finally:
        await two.close()


async def one_store_job(tmp_path: Path, job_id: str) -> str:
    with sqlite3.connect(tmp_path / "bot.sqlite3") as conn:
        return conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


async def test_restart_redelivers_saved_images_without_drawing_again(tmp_path: Path) -> None:
    one = Harness(
        tmp_path,
    )
    await one.open()
    ticket = await one.draw(ALICE, "deliver later")
    one.hub.fail_deliveries[ticket.job.id] = 100
    await one.until(lambda hub: len(hub.of(ticket.job.id, "delivery-error")) >= 1)
    await one.close()
    assert await one_store_job(tmp_path, ticket.job.id) == "delivering"

    two = Harness(tmp_path)
    await two.open()
    try:
        await two.until(lambda hub: ticket.job.id in hub.finished())
        await two.settled()
        assert two.gen.runs == []  # not drawn again
        kinds = sorted(r[1] for r in ledger(two.settings.db_path))
        assert kinds == ["commit", "reserve"]
    finally:
        await two.close()


async def test_recovery_fails_and_refunds_jobs_of_a_missing_platform(tmp_path: Path) -> None:
    one = Harness(tmp_path)
    one.gen.hold = True
    await one.open()
    await one.draw(ALICE, "x")
    await one.gen.started.wait()
    queued = await one.draw(ALICE, "y")
    await one.close()

    two = Harness(tmp_path)
    two.hub = RecordingHub()
    store = SqliteStore(two.settings.db_path)
    await store.start()
    service = Service(settings=two.settings, store=store, workers=[two.gen],
                      sink=ImageStore(two.settings.output_dir, "scripted"))  # fmt: skip
    await service.start()
    try:
        assert await service.recover() == 2  # nobody registered the "test" platform
        job = await store.get_job(queued.job.id)
        assert job is not None and job.state is JobState.FAILED
        assert (await service.credits(ALICE)).available == 10
    finally:
        await service.close()
        await store.close()


async def test_admin_operations_need_an_admin_and_land_in_the_ledger(h: Harness) -> None:
    svc = h.service
    before = ledger(h.settings.db_path)
    for call in (
        svc.admin_show(BOB, ALICE),
        svc.admin_set(BOB, ALICE, 100),
        svc.admin_grant(BOB, ALICE, 5),
        svc.admin_reset(BOB, ALICE),
        svc.admin_ban(BOB, ALICE),
        svc.admin_weight(BOB, ALICE, 2),
        svc.stats(BOB),
    ):
        with pytest.raises(NotAuthorizedError):
            await call
    assert ledger(h.settings.db_path) == before

    assert (await svc.admin_set(ADMIN, ALICE, 3)).available == 3
    assert (await svc.admin_grant(ADMIN, ALICE, 4)).available == 7
    await h.draw(ALICE, "x")
    await h.settled()
    assert (await svc.admin_reset(ADMIN, ALICE)).available == 7
    await svc.admin_weight(ADMIN, ALICE, 2.0)
    await svc.admin_ban(ADMIN, ALICE)
    view = await svc.admin_show(ADMIN, ALICE)
    assert view.record.banned and view.record.weight == 2.0
    kinds = [e.kind.value for e in view.history]
    assert {"set", "grant", "reset", "weight", "ban", "reserve", "commit"} <= set(kinds)
    assert all(
        e.actor == "test:admin" for e in view.history if e.kind.value in {"set", "grant", "reset", "ban"}
    )
    stats = await svc.stats(ADMIN)
    assert stats["queued"] == 0
    with pytest.raises(RequestError):
        await svc.admin_ban(ADMIN, ADMIN)


async def test_admins_draw_free(h: Harness) -> None:
    ticket = await h.draw(ADMIN, "x --n 3")
    assert ticket.credits_left is None
    await h.settled()
    assert ledger(h.settings.db_path) == []
    assert (await h.service.credits(ADMIN)).unlimited


async def test_positions_and_queue_view(h: Harness) -> None:
    h.gen.hold = True
    await h.draw(ALICE, "a0")
    await h.gen.started.wait()
    a1 = await h.draw(ALICE, "a1")
    b0 = await h.draw(BOB, "b0")
    assert h.service.position(b0.job.id)[0] == 0
    assert h.service.position(a1.job.id)[0] == 1
    view = h.service.queue_view()
    assert [e.running for e in view.entries] == [True, False, False]
    assert [e.job.id for e in view.entries[1:]] == [b0.job.id, a1.job.id]
    assert view.entries[2].eta_seconds >= view.entries[1].eta_seconds
    mine = await h.service.my_jobs(ALICE)
    assert {e.job.request.prompt for e in mine} == {"a0", "a1"}
    h.gen.hold = False
    h.gen.release()


class SlowProgressHub(RecordingHub):
    """A chat whose progress edits are slow: records when each call starts and ends."""

    async def status(self, job: Any, text: str, phase: Any) -> None:
        if phase.value == "queued":
            self.record(ReplyEvent("queued", job.id))
            return
        self.record(ReplyEvent("progress-start", job.id))
        await asyncio.sleep(0.05)
        self.record(ReplyEvent("progress-end", job.id))


@pytest.mark.parametrize("outcome", ["delivered", "failed"])
async def test_no_progress_lands_after_the_result(h: Harness, outcome: str) -> None:
    hub = SlowProgressHub()
    h.service.register(hub)
    if outcome == "failed":
        h.gen.errors.append(OutOfMemoryError("out of memory"))
    await h.draw(ALICE, "slow chat --steps 6")
    await h.settled()
    log = [e.kind for e in hub.events]
    assert log[0] == "queued" and log[-1] == outcome
    assert "progress-start" in log
    assert log.count("progress-start") == log.count("progress-end")  # every edit finished before the result
    assert log.index(outcome) > max(i for i, e in enumerate(log) if e == "progress-end")


@pytest.mark.parametrize("ahead", [0.0, 5.0])
async def test_a_chat_that_cannot_take_more_results_lets_other_chats_draw_first(
    tmp_path: Path, ahead: float
) -> None:
    from bot.budget import SlidingWindow

    h = Harness(tmp_path, delivery_ahead=ahead)
    # the group may receive one message a minute (the first job's status takes it); BOB's chat is free
    h.hub.budget_factory = lambda lane: SlidingWindow(1, 60.0) if lane.board else SlidingWindow(100, 1.0)
    await h.open()
    try:
        h.gen.hold = True
        group = {"chat": "g", "group": True}
        for n in range(4):
            user = UserRef(platform="test", id=f"member{n}")
            await h.service.submit(user, h.service.parse(f"group {n}"), delivery=group)
            if n == 0:
                await h.gen.started.wait()
        private = await h.draw(BOB, "private")
        h.gen.hold = False
        h.gen.release()
        await h.until(lambda hub: private.job.id in hub.finished())
        order = [prompt for prompt, _ in h.gen.runs]
        if ahead:
            assert order[:2] == ["group 0", "private"]  # the group's pictures could not be sent for a minute
        else:
            assert order == ["group 0", "group 1", "group 2", "group 3", "private"]  # strict fair order
    finally:
        await h.close()


def untold(tmp_path: Path, job_id: str) -> int:
    with sqlite3.connect(tmp_path / "bot.sqlite3") as conn:
        return int(conn.execute("SELECT untold FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])


async def test_a_failure_the_crash_kept_from_its_requester_is_told_after_the_restart(tmp_path: Path) -> None:
    one = Harness(tmp_path)
    one.gen.hold = True
    await one.open()
    ticket = await one.draw(ALICE, "told late")
    told = await one.draw(BOB, "told at once")
    await one.gen.started.wait()
    await one.service.cancel(BOB, told.job.id)  # a queued job's end is told at once ...
    await one.until(lambda hub: bool(hub.of(told.job.id, "failed")))
    async with asyncio.timeout(10):  # and recorded as told
        while untold(tmp_path, told.job.id):
            await asyncio.sleep(0.02)
    await one.close()
    # ... then the other one ended, and the process died before its chat heard of it
    store = SqliteStore(tmp_path / "bot.sqlite3")
    await store.start()
    assert await store.finish_job(ticket.job.id, JobState.FAILED, at=1.0, error="out of memory", untold=True)
    await store.close()
    assert untold(tmp_path, ticket.job.id) == 1 and untold(tmp_path, told.job.id) == 0

    two = Harness(tmp_path)
    await two.open()
    try:
        await two.until(lambda hub: bool(hub.of(ticket.job.id, "failed")))
        [notice] = two.hub.of(ticket.job.id, "failed")
        assert f"Job {ticket.job.id} failed: out of memory" in notice.data and "refunded" in notice.data
        assert not two.hub.of(told.job.id)  # told before: not again
        await two.settled()
        async with asyncio.timeout(10):
            while untold(tmp_path, ticket.job.id):
                await asyncio.sleep(0.02)
    finally:
        await two.close()
    three = Harness(tmp_path)
    await three.open()
    try:
        await three.settled()
        assert not three.hub.events  # nothing owed any more
    finally:
        await three.close()

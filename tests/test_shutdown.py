"""SIGTERM, for real: ``python -m bot`` as a subprocess against the fake Telegram, on the tiny model.

SIGTERM stops intake (a new /draw is refused with one line), lets the running image finish and
its result go out within ``SHUTDOWN_GRACE`` seconds, and exits 0; with no grace left the image
is interrupted and resumes on the next start, delivered once and charged once.

The process is ``tests.botprocess.BotProcess``: awaited with asyncio's subprocess API, so the
fake on this test's loop keeps answering the bot while the test waits for it.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot import messages
from bot.errors import RefusedError
from tests.botprocess import BotProcess, check_books, mid_draw_text, telegram_env
from tests.fakes.telegram_server import ApiCall, FakeTelegram
from tests.test_service import ALICE as A
from tests.test_service import BOB as B
from tests.test_service import Harness

ALICE = FakeTelegram.user(11, "Alice", "alice")
BOB = FakeTelegram.user(12, "Bob", "bob")
GROUP = -100_222
#: long enough that the signal lands while most steps are still to run (a tiny-model step takes
#: tens of milliseconds); progress is edited into the group's status after every step
SLOW = "/draw a slow fox --steps 40"


@pytest.fixture(autouse=True)
def _loopback_without_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake


def mid_draw(call: ApiCall) -> bool:
    """A progress edit from the middle of the drawing (steps are left to run)."""
    return call.method == "editMessageText" and mid_draw_text(str(call.params.get("text", "")))


def ledger(db: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(db) as conn:
        return sorted(conn.execute("SELECT kind, amount FROM ledger WHERE job_id IS NOT NULL").fetchall())


def job_states(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT state FROM jobs ORDER BY created_at")]


async def test_sigterm_refuses_new_work_lets_the_image_finish_and_exits_0(
    tg: FakeTelegram, tmp_path: Path, tiny_model_dir: Path
) -> None:
    group, bob = tg.group(GROUP, "artists"), tg.private_chat(BOB)
    bot = BotProcess(tmp_path, tiny_model_dir, telegram_env(tg), SHUTDOWN_GRACE="300")
    await bot.start()
    try:
        await bot.logged("brushbot is running")
        tg.inject_message(group, ALICE, SLOW)
        await tg.wait_for("editMessageText", mid_draw)
        bot.signal(signal.SIGTERM)
        await bot.logged("stopping intake")
        tg.inject_message(bob, BOB, "/draw too late")
        refusal = await tg.wait_for("sendMessage", lambda c: c.chat_id == bob["id"])
        assert messages.SHUTTING_DOWN.lower() in str(refusal.params["text"]).lower()
        assert await bot.exited() == 0
    finally:
        await bot.kill()
    photos = tg.calls_of("sendPhoto", GROUP, ok=True)
    assert len(photos) == 1 and photos[0].seq > refusal.seq  # drawn to the end after the signal
    assert any("started jobs finished" in line for line in bot.lines)
    db = tmp_path / "bot.sqlite3"
    assert job_states(db) == ["delivered"]
    assert [kind for kind, _ in ledger(db)] == ["commit", "reserve"]  # charged once


async def test_sigterm_without_grace_requeues_the_image_and_the_next_start_delivers_it_once(
    tg: FakeTelegram, tmp_path: Path, tiny_model_dir: Path
) -> None:
    group = tg.group(GROUP, "artists")
    first = BotProcess(
        tmp_path, tiny_model_dir, telegram_env(tg), SHUTDOWN_GRACE="0", GROUP_PROGRESS_INTERVAL="0.3"
    )
    await first.start()
    try:
        await first.logged("brushbot is running")
        tg.inject_message(group, ALICE, SLOW)
        await tg.wait_for("editMessageText", mid_draw)
        first.signal(signal.SIGTERM)
        assert await first.exited() == 0
    finally:
        await first.kill()
    db = tmp_path / "bot.sqlite3"
    assert tg.calls_of("sendPhoto") == []
    assert job_states(db) == ["running"]  # left for the next start, its credits still reserved
    assert [kind for kind, _ in ledger(db)] == ["reserve"]

    # the fake's group window still counts the first run's messages, which the new process cannot
    # know: few progress edits this time, so the result is not held up by a 429
    second = BotProcess(
        tmp_path, tiny_model_dir, telegram_env(tg), SHUTDOWN_GRACE="300", GROUP_PROGRESS_INTERVAL="30"
    )
    await second.start()
    try:
        await tg.wait_for("sendPhoto")
        second.signal(signal.SIGTERM)
        assert await second.exited() == 0
    finally:
        await second.kill()
    assert len(tg.calls_of("sendPhoto", GROUP, ok=True)) == 1 and not tg.rate_limited
    assert job_states(db) == ["delivered"]
    assert [kind for kind, _ in ledger(db)] == ["commit", "reserve"]


async def test_the_console_drains_on_sigterm_like_the_chat_bot(tmp_path: Path, tiny_model_dir: Path) -> None:
    # stdin stays open: the stop must not wait for a line that never comes
    bot = BotProcess(
        tmp_path, tiny_model_dir, {}, "console", stdin=True, SHUTDOWN_GRACE="300", MAX_STEPS="200",
        DAILY_CREDITS="100",
    )  # fmt: skip
    await bot.start()
    try:
        await bot.said("brushbot console")
        await bot.type("/draw a slow fox --steps 200")
        await bot.said(mid_draw_text)
        bot.signal(signal.SIGTERM)
        await bot.logged("stopping intake")
        await bot.type("/draw too late")
        await bot.said(lambda line: messages.SHUTTING_DOWN.lower() in line.lower())
        assert await bot.exited() == 0, "\n".join(bot.lines[-30:])
    finally:
        await bot.kill()
    assert any("1 started job(s) may finish" in line for line in bot.lines)  # it was drawing at the signal
    assert any("started jobs finished" in line for line in bot.lines)  # and was drawn to the end
    db = tmp_path / "bot.sqlite3"
    assert job_states(db) == ["delivered"]  # the late /draw left no row
    assert [line for line in bot.out if " done in " in line]  # its result: where it was saved
    check_books(db)


# ---------------------------------------------------------------------- the service's part, in process


async def test_drain_refuses_new_jobs_finishes_the_running_one_and_keeps_the_queued(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.gen.hold = True
    await h.open()
    try:
        running = await h.draw(A, "running")
        await h.gen.started.wait()
        queued = await h.draw(A, "queued")
        cancelled = await h.draw(B, "cancelled while draining")
        draining = asyncio.ensure_future(h.service.drain(30))
        await asyncio.sleep(0)  # drain has begun: intake is closed
        with pytest.raises(RefusedError, match="restarting"):
            await h.draw(B, "too late")
        assert not draining.done()  # the running job holds it
        await h.service.cancel(B, cancelled.job.id)
        h.gen.release()
        assert await asyncio.wait_for(draining, 30) is True
        states = {t.job.id: (await h.store.get_job(t.job.id)).state for t in (running, queued, cancelled)}  # type: ignore[union-attr]
        assert states == {
            running.job.id: "delivered", queued.job.id: "queued", cancelled.job.id: "cancelled"
        }  # fmt: skip
        assert h.gen.runs == [("running", running.job.seeds)]
    finally:
        await h.close()


async def test_drain_that_runs_out_of_grace_leaves_the_running_job_for_the_next_start(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.gen.hold = True
    await h.open()
    try:
        await h.draw(A, "running")
        await h.gen.started.wait()
        hurry = asyncio.Event()
        draining = asyncio.ensure_future(h.service.drain(3600, hurry))
        hurry.set()  # a second SIGTERM
        assert await asyncio.wait_for(draining, 30) is False
    finally:
        await h.close()
    with sqlite3.connect(tmp_path / "bot.sqlite3") as conn:
        assert conn.execute("SELECT state FROM jobs").fetchall() == [("running",)]

"""SIGTERM, for real: ``python -m bot`` as a subprocess against the fake Telegram, on the tiny model.

SIGTERM stops intake (a new /draw is refused with one line), lets the running image finish and
its result go out within ``SHUTDOWN_GRACE`` seconds, and exits 0; with no grace left the image
is interrupted and resumes on the next start, delivered once and charged once.

The fake lives on this test's event loop, so the bot process is awaited with asyncio's
subprocess API: the loop keeps answering the bot while the test waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot import messages
from bot.errors import RefusedError
from tests.fakes.telegram_server import ApiCall, FakeTelegram
from tests.test_service import ALICE as A
from tests.test_service import BOB as B
from tests.test_service import Harness

ROOT = Path(__file__).resolve().parent.parent
ALICE = FakeTelegram.user(11, "Alice", "alice")
BOB = FakeTelegram.user(12, "Bob", "bob")
GROUP = -100_222
#: long enough that the signal lands while most steps are still to run (a tiny-model step takes
#: tens of milliseconds); progress is edited into the group's status after every step
SLOW = "/draw a slow fox --steps 40"


class BotProcess:
    """``python -m bot`` with its stderr collected line by line (waitable)."""

    def __init__(self, tg: FakeTelegram, tmp_path: Path, model: Path, **env: str) -> None:
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.endswith("_TOKEN") and k not in ("MODEL", "ADMIN_IDS")
        }
        self.env.update(
            MODEL=str(model), DEVICE="cpu", WARMUP="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
            DB_PATH=str(tmp_path / "bot.sqlite3"), OUTPUT_DIR=str(tmp_path / "outputs"),
            TELEGRAM_TOKEN=tg.token, TELEGRAM_BASE_URL=tg.base_url, TELEGRAM_BASE_FILE_URL=tg.base_file_url,
            PROGRESS_INTERVAL="0.01", GROUP_PROGRESS_INTERVAL="0.01", DAILY_CREDITS="10", LOG_LEVEL="INFO",
            NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PTB_TIMEDELTA="1",
        )  # fmt: skip
        self.env.update(env)
        self.cwd = tmp_path
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", cwd=self.cwd, env=self.env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip())
            self._changed.set()

    async def logged(self, text: str, timeout: float = 120) -> None:
        """Wait until a stderr line contains ``text`` (the timeout is a safety net)."""
        async with asyncio.timeout(timeout):
            while not any(text in line for line in self.lines):
                self._changed.clear()
                await self._changed.wait()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def exited(self, timeout: float = 120) -> int:
        assert self.proc is not None and self._reader is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


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
    text = str(call.params.get("text", ""))
    if call.method != "editMessageText" or " step " not in text:
        return False
    done, total = text.rsplit(" step ", 1)[1].split("/")
    return 0 < int(done) < int(total)


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
    bot = BotProcess(tg, tmp_path, tiny_model_dir, SHUTDOWN_GRACE="300")
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
    first = BotProcess(tg, tmp_path, tiny_model_dir, SHUTDOWN_GRACE="0", GROUP_PROGRESS_INTERVAL="0.3")
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
    second = BotProcess(tg, tmp_path, tiny_model_dir, SHUTDOWN_GRACE="300", GROUP_PROGRESS_INTERVAL="30")
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

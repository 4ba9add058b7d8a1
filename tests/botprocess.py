"""``python -m bot`` as a subprocess for the real-signal tests, and the books check after a crash.

The fakes live on the test's event loop, so the process is started and awaited with asyncio's
subprocess API: the loop keeps serving the bot while a test waits for a log line or the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

from tests.fakes.discord_server import FakeDiscord
from tests.fakes.telegram_server import FakeTelegram
from tests.leaks import SCANNER

ROOT = Path(__file__).resolve().parent.parent


def telegram_env(tg: FakeTelegram) -> dict[str, str]:
    """The settings that point the bot at the fake Telegram only."""
    return {
        "TELEGRAM_TOKEN": tg.token,
        "TELEGRAM_BASE_URL": tg.base_url,
        "TELEGRAM_BASE_FILE_URL": tg.base_file_url,
        "PTB_TIMEDELTA": "1",
    }


def discord_env(fake: FakeDiscord) -> dict[str, str]:
    """The settings that point the bot at the fake Discord only (commands synced to its guild)."""
    return {
        "DISCORD_TOKEN": fake.token,
        "DISCORD_API_BASE_URL": fake.url,
        "DISCORD_GATEWAY_URL": fake.gateway_url,
        "DISCORD_GUILD_ID": str(fake.guild_id),
    }


class BotProcess:
    """``python -m bot`` on the tiny model with its stderr collected line by line (waitable).

    ``platform`` is ``telegram_env(...)``, ``discord_env(...)`` or empty (the console); the
    database and outputs are under ``tmp_path``, so a second process picks up where one left off.
    """

    def __init__(
        self, tmp_path: Path, model: Path, platform: Mapping[str, str], *args: str, stdin: bool = False,
        **env: str,
    ) -> None:  # fmt: skip
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.endswith("_TOKEN") and not k.startswith(("DISCORD_", "TELEGRAM_"))
            and k not in ("MODEL", "ADMIN_IDS")
        }  # fmt: skip
        self.env.update(
            MODEL=str(model), DEVICE="cpu", WARMUP="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT),
            DB_PATH=str(tmp_path / "bot.sqlite3"), OUTPUT_DIR=str(tmp_path / "outputs"),
            PROGRESS_INTERVAL="0.01", GROUP_PROGRESS_INTERVAL="0.01", DAILY_CREDITS="10", LOG_LEVEL="INFO",
            NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
        )  # fmt: skip
        self.env.update(platform)
        self.env.update(env)
        self.args: Sequence[str] = args
        self.cwd = tmp_path
        self.with_stdin = stdin
        self.lines: list[str] = []  # stderr: the log
        self.out: list[str] = []  # stdout: what the console says
        self._changed = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        pipe, devnull = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", *self.args, cwd=self.cwd, env=self.env,
            stdin=pipe if self.with_stdin else devnull, stdout=pipe, stderr=pipe,
        )  # fmt: skip
        assert self.proc.stderr is not None and self.proc.stdout is not None
        self._readers = [
            asyncio.create_task(self._read(self.proc.stderr, self.lines, "python -m bot stderr")),
            asyncio.create_task(self._read(self.proc.stdout, self.out, "python -m bot stdout")),
        ]

    async def _read(self, stream: asyncio.StreamReader, into: list[str], source: str) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            SCANNER.feed(source, line)  # the test that started the process fails if a secret is in it
            into.append(line)
            self._changed.set()

    async def _seen(self, text: str | Callable[[str], bool], lines: list[str], timeout: float) -> None:
        match = text if callable(text) else lambda line: text in line
        async with asyncio.timeout(timeout):
            while not any(match(line) for line in lines):
                self._changed.clear()
                await self._changed.wait()

    async def logged(self, text: str, timeout: float = 120) -> None:
        """Wait until a stderr line contains ``text`` (the timeout is a safety net)."""
        await self._seen(text, self.lines, timeout)

    async def said(self, text: str | Callable[[str], bool], timeout: float = 120) -> None:
        """Wait until a stdout line contains ``text`` (or matches it) (the timeout is a safety net)."""
        await self._seen(text, self.out, timeout)

    async def type(self, line: str) -> None:
        """A line on the process's stdin (``stdin=True``)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def exited(self, timeout: float = 120) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await asyncio.gather(*self._readers)
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for reader in self._readers:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


def mid_draw_text(text: str) -> bool:
    """A progress line from the middle of the drawing (steps are left to run)."""
    if " step " not in text:
        return False
    done, total = text.rsplit(" step ", 1)[1].split("/")[:2]
    return 0 < int(done) < int(total.split()[0])


def job_ids(db: Path) -> list[str]:
    """Every job's id, oldest first."""
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM jobs ORDER BY created_at")]


def books(db: Path) -> tuple[dict[str, str], list[str]]:
    """Every job's state, and what does not add up: a user whose ledger is not minus what their
    delivered jobs cost, a job committed or reserved more than once."""
    with sqlite3.connect(db) as conn:
        jobs = conn.execute("SELECT id, user_id, state, credits FROM jobs").fetchall()
        rows = conn.execute(
            "SELECT user_id, kind, amount, job_id FROM ledger WHERE job_id IS NOT NULL"
        ).fetchall()
    wrong: list[str] = []
    for user in sorted({u for _, u, _, _ in jobs}):
        owed = sum(credits for _, u, state, credits in jobs if u == user and state == "delivered")
        paid = sum(amount for u, _, amount, _ in rows if u == user)
        if paid != -owed:
            wrong.append(f"user {user}: ledger {paid}, delivered jobs cost {owed}")
    for kind in ("commit", "reserve"):
        counts = Counter(job for _, k, _, job in rows if k == kind)
        wrong.extend(f"job {job}: {n} {kind} rows" for job, n in sorted(counts.items()) if n > 1)
    return {job_id: state for job_id, _, state, _ in jobs}, wrong


def check_books(db: Path) -> dict[str, str]:
    """Every job's state; asserts the ledger adds up per user and each job is committed at most once."""
    states, wrong = books(db)
    assert not wrong, wrong
    return states


async def crash(process: BotProcess, reach: Callable[[], Awaitable[int]]) -> int:
    """Start ``process``, let ``reach()`` bring a job to the chosen point, SIGKILL it there.

    ``reach`` returns how many jobs were accepted before the kill; so does this.
    """
    await process.start()
    try:
        await process.logged("brushbot is running")
        draws = await reach()
        process.signal(signal.SIGKILL)
        assert await process.exited() == -signal.SIGKILL
    finally:
        await process.kill()
    return draws


async def restart_until_delivered(process: BotProcess, db: Path, draws: int) -> list[str]:
    """Start ``process`` on the crashed one's database, wait until every job is delivered, SIGTERM it.

    Asserts that no job was recorded delivered before the kill (every kill point comes before
    that: at 'answered' the fake holds the platform's answer past the kill), that every accepted
    job has its row (nothing lost at the kill) and that the drain exits 0; returns the job ids,
    oldest first.
    """
    with sqlite3.connect(db) as conn:
        done = [row[0] for row in conn.execute("SELECT id FROM jobs WHERE state = 'delivered'")]
    assert not done, f"recorded delivered before the kill, so the kill point was missed: {done}"
    await process.start()
    try:
        await process.logged("brushbot is running")
        ids = job_ids(db)
        assert len(ids) == draws  # nothing lost at the kill: every accepted job has its row
        for job_id in ids:  # none was recorded delivered before the kill: each is, now
            await process.logged(f"job {job_id} delivered")
        process.signal(signal.SIGTERM)  # drain: the last database writes happen before it exits
        assert await process.exited() == 0, "\n".join(process.lines[-30:])
    finally:
        await process.kill()
    return ids

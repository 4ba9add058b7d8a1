"""Resources that run out or go wrong: the output folder, a busy or damaged database, a second bot.

A full or unwritable output folder fails that job (refunded, one log line) and the next job
works once space is back; a database another process holds is waited for, never a lost
credit; a second bot on the same database, or a damaged one, stops at start with one line and
changes nothing; the database is readable by its owner only.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import sqlite3
import stat
import sys
from pathlib import Path

import pytest

from bot.domain import Job, JobState
from bot.errors import ConfigError
from bot.messages import SAVE_FAILED
from bot.ports import Rendered
from data import SqliteStore
from generation.images import ImageStore
from tests.test_cli import run_bot
from tests.test_service import ALICE, Harness, ledger


def kinds(h: Harness) -> list[str]:
    return sorted(row[1] for row in ledger(h.settings.db_path))


async def one_job(h: Harness, text: str) -> Job:
    ticket = await h.draw(ALICE, text)
    await h.until(lambda hub: ticket.job.id in hub.finished() or hub.of(ticket.job.id, "failed"))
    await h.settled()
    job = await h.store.get_job(ticket.job.id)
    assert job is not None
    return job


def save_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "bot.service" and r.levelno >= logging.ERROR]


# ---------------------------------------------------------------------- the output folder


async def test_unwritable_output_dir_fails_the_job_refunded_then_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")  # mkdir there fails: not a directory
    h = Harness(tmp_path)
    await h.open()
    try:
        failed = await one_job(h, "first")
        assert failed.state is JobState.FAILED and failed.error == SAVE_FAILED
        assert h.hub.of(failed.id, "failed")[0].data == (
            f"Job {failed.id} failed: {SAVE_FAILED}. Your 1 credit(s) were refunded."
        )
        errors = save_errors(caplog)
        assert len(errors) == 1 and errors[0].exc_info is None and "\n" not in errors[0].getMessage()
        assert (await h.service.credits(ALICE)).available == 10

        blocker.unlink()  # the operator fixes it; no restart
        done = await one_job(h, "second")
        assert done.state is JobState.DELIVERED and Path(done.outputs[0]).is_file()
        assert kinds(h) == ["commit", "refund", "reserve", "reserve"]
    finally:
        await h.close()


class FullDisk:
    """The real ImageStore on a disk that is full while ``full`` is set (the write fails as ENOSPC does)."""

    def __init__(self, inner: ImageStore) -> None:
        self.inner = inner
        self.full = True

    def save(self, job: Job, rendered: Rendered):  # type: ignore[no-untyped-def]
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.inner.save(job, rendered)

    def fit(self, path: str, limit_bytes: int):  # type: ignore[no-untyped-def]
        return self.inner.fit(path, limit_bytes)


async def test_full_disk_fails_the_job_refunded_and_the_bot_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(tmp_path)
    h.sink = disk = FullDisk(ImageStore(h.settings.output_dir, "scripted"))
    await h.open()
    try:
        failed = await one_job(h, "first")
        assert failed.state is JobState.FAILED and failed.error == SAVE_FAILED
        [line] = save_errors(caplog)
        assert "No space left on device" in line.getMessage() and line.exc_info is None
        disk.full = False
        assert (await one_job(h, "second")).state is JobState.DELIVERED
        assert (await h.service.credits(ALICE)).available == 9
    finally:
        await h.close()


# ---------------------------------------------------------------------- a busy database

HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
print("released", flush=True)
"""


class BusySeen(logging.Handler):
    """Sets an event when the store says the file is busy (logged on the event loop's thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "is busy" in record.getMessage():
            self.seen.set()


async def test_a_database_held_by_another_process_is_waited_for_and_no_credit_is_lost(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path)
    # wait little inside SQLite, so the store's own retries are what carries the write through
    h.store_options = {"busy_timeout": 0.05, "busy_backoff": (0.05,) * 400}
    h.gen.hold = True
    await h.open()
    watcher = BusySeen()
    logging.getLogger("data.sqlite_store").addHandler(watcher)
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, str(h.settings.db_path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        ticket = await h.draw(ALICE)
        await h.gen.started.wait()
        assert holder.stdout is not None and holder.stdin is not None
        assert (await holder.stdout.readline()).strip() == b"locked"
        h.gen.release()  # the job finishes while the other process holds the database
        await asyncio.wait_for(watcher.seen.wait(), 30)
        holder.stdin.write(b"go\n")
        await holder.stdin.drain()
        assert (await holder.stdout.readline()).strip() == b"released"
        await h.until(lambda hub: ticket.job.id in hub.finished())
        await h.settled()
        job = await h.store.get_job(ticket.job.id)
        assert job is not None and job.state is JobState.DELIVERED
        assert h.store.busy_retries > 0
        assert kinds(h) == ["commit", "reserve"]
        assert (await h.service.credits(ALICE)).available == 9
    finally:
        logging.getLogger("data.sqlite_store").removeHandler(watcher)
        if holder.returncode is None:
            holder.kill()
        await holder.wait()
        await h.close()


# ---------------------------------------------------------------------- one bot per database


async def test_a_second_exclusive_store_on_the_same_file_refuses(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    async with SqliteStore(path, exclusive=True):
        with pytest.raises(ConfigError, match=r"another brushbot process \(pid \d+\) is using database"):
            await SqliteStore(path, exclusive=True).start()
    async with SqliteStore(path, exclusive=True):  # released on close
        pass


async def test_a_second_bot_process_on_the_same_database_refuses_to_start(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "bot.sqlite3", exclusive=True):
        done = await asyncio.to_thread(run_bot, ["console"], tmp_path, Path("tiny"), "/quit\n")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"brushbot: another brushbot process (pid {os.getpid()}) is using database")
    assert "Traceback" not in done.stderr and "loading model" not in done.stderr


# ---------------------------------------------------------------------- damaged and unreadable


def damaged_database(path: Path) -> bytes:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x TEXT)")
    conn.executemany("INSERT INTO t VALUES (?)", [(f"row {i} " * 20,) for i in range(400)])
    conn.commit()
    conn.close()
    data = bytearray(path.read_bytes())
    page = 4096
    data[2 * page : 3 * page] = b"\xde\xad\xbe\xef" * (page // 4)  # a table page full of garbage
    path.write_bytes(bytes(data))
    return bytes(data)


async def test_a_damaged_database_stops_the_start_and_is_not_changed(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    before = damaged_database(path)
    with pytest.raises(ConfigError) as err:
        await SqliteStore(path).start()
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert path.read_bytes() == before
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0


async def test_a_damaged_or_unreadable_database_is_one_line_from_the_command(tmp_path: Path) -> None:
    before = damaged_database(tmp_path / "bot.sqlite3")
    done = await asyncio.to_thread(run_bot, ["console"], tmp_path, Path("tiny"), "/quit\n")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("brushbot: ")
    assert (tmp_path / "bot.sqlite3").read_bytes() == before

    shutil.rmtree(tmp_path / "outputs", ignore_errors=True)
    (tmp_path / "bot.sqlite3").unlink()
    (tmp_path / "bot.sqlite3").mkdir()  # not a file at all: unreadable as a database
    done = await asyncio.to_thread(run_bot, ["console"], tmp_path, Path("tiny"), "/quit\n")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("brushbot: cannot open database")


async def test_the_database_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "data" / "bot.sqlite3"
    old = os.umask(0o022)
    try:
        async with SqliteStore(path, exclusive=True) as store:
            await store.touch_user(ALICE, "alice")
            for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}.lock")):
                assert stat.S_IMODE(name.stat().st_mode) & 0o077 == 0, name
    finally:
        os.umask(old)

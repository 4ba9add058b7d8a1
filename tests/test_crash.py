"""Real crashes: ``python -m bot`` is SIGKILLed at chosen moments against the fake Telegram, then restarted.

Each test starts the bot on the tiny model, kills it with SIGKILL at one point of a job's life
(queued, mid-denoise, after the PNG was saved, after Telegram answered the upload but before the
database heard of it), starts it again on the same database and output folder, and checks:
every job delivered, none lost; each user's ledger adds up to what their delivered jobs cost,
with one commit per job; and a second copy of a result only where a send was in flight at the kill.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.telegram import parse_callback
from tests.fakes.telegram_server import ApiCall, FakeTelegram, Limit
from tests.test_shutdown import BotProcess, _loopback_without_proxy, mid_draw  # noqa: F401  (a fixture)

ALICE = FakeTelegram.user(21, "Alice", "alice")
BOB = FakeTelegram.user(22, "Bob", "bob")
GROUP = -100_333
#: a job long enough to be caught drawing; in a quiet group its status is edited after every step
SLOW = "/draw a slow fox --steps 50"
QUICK = "/draw a quick fox"


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    # The bot keeps Telegram's 20-a-minute group budget itself, but a restarted process cannot know
    # what the killed one spent: the fake does not hold that against it (no 429 wait in these tests).
    async with FakeTelegram(group_limit=Limit(calls=1000, window=60.0)) as fake:
        yield fake


def to(chat: dict[str, object]) -> object:
    return lambda call: call.chat_id == chat["id"]


def photo_job(call: ApiCall) -> str:
    """The job id a delivered photo's buttons carry."""
    markup = call.params.get("reply_markup") or {}
    for button in (b for row in markup.get("inline_keyboard", []) for b in row):
        parsed = parse_callback(button.get("callback_data"))
        if parsed is not None:
            return parsed[1]
    return f"?{call.seq}"


def check_books(db: Path) -> dict[str, str]:
    """Every job's state; asserts the ledger adds up per user and each job is committed at most once."""
    with sqlite3.connect(db) as conn:
        jobs = conn.execute("SELECT id, user_id, state, credits FROM jobs").fetchall()
        rows = conn.execute(
            "SELECT user_id, kind, amount, job_id FROM ledger WHERE job_id IS NOT NULL"
        ).fetchall()
    for user in {u for _, u, _, _ in jobs}:
        owed = sum(credits for _, u, state, credits in jobs if u == user and state == "delivered")
        assert sum(amount for u, _, amount, _ in rows if u == user) == -owed, user
    commits = Counter(job for _, kind, _, job in rows if kind == "commit")
    assert all(n == 1 for n in commits.values()), commits
    reserves = Counter(job for _, kind, _, job in rows if kind == "reserve")
    assert all(n == 1 for n in reserves.values()), reserves
    return {job_id: state for job_id, _, state, _ in jobs}


@pytest.mark.parametrize("point", ["queued", "denoise", "saved", "answered"])
async def test_sigkill_then_restart_delivers_everything_and_the_books_add_up(
    tg: FakeTelegram,
    tmp_path: Path,
    tiny_model_dir: Path,
    point: str,
) -> None:
    slow = point in ("queued", "denoise")
    # progress shows in a group at every step; the upload's chat action only in a private chat
    alice = tg.group(GROUP, "artists") if slow else tg.private_chat(ALICE)
    bob = tg.private_chat(BOB)
    first = BotProcess(tg, tmp_path, tiny_model_dir, SHUTDOWN_GRACE="300", DAILY_CREDITS="100")
    await first.start()
    draws = 1
    try:
        await first.logged("brushbot is running")
        tg.inject_message(alice, ALICE, SLOW if slow else QUICK)
        if point == "queued":
            await tg.wait_for("editMessageText", lambda c: mid_draw(c) and c.chat_id == alice["id"])
            tg.inject_message(bob, BOB, "/draw a queued cat")  # waits behind Alice's job
            draws = 2
            await tg.wait_for("sendMessage", to(bob))
        elif point == "denoise":
            await tg.wait_for("editMessageText", mid_draw)
        elif point == "saved":
            # sent only after the PNG is written and the row says "delivering"; the upload follows at once
            await tg.wait_for("sendChatAction", to(alice))
        else:
            await tg.wait_for("sendPhoto", to(alice))  # answered; the bot has not recorded it yet
        first.signal(9)
        assert await first.exited() == -9
    finally:
        await first.kill()
    in_flight = point in ("saved", "answered")  # a send may have been under way at the kill

    second = BotProcess(tg, tmp_path, tiny_model_dir, SHUTDOWN_GRACE="300", DAILY_CREDITS="100")
    await second.start()
    try:
        await second.logged("brushbot is running")
        db = tmp_path / "bot.sqlite3"
        with sqlite3.connect(db) as conn:
            ids = [row[0] for row in conn.execute("SELECT id FROM jobs ORDER BY created_at")]
        assert len(ids) == draws  # nothing lost at the kill: every accepted job has its row

        for job_id in ids:  # none was recorded delivered before the kill: each is, now
            await second.logged(f"job {job_id} delivered")
        second.signal(15)  # drain: the last database writes happen before it exits
        assert await second.exited() == 0, "\n".join(second.lines[-30:])
    finally:
        await second.kill()

    states = check_books(db)
    assert set(states.values()) == {"delivered"}, states
    copies = Counter(photo_job(c) for c in tg.calls_of("sendPhoto", ok=True))
    assert set(copies) == set(ids)
    assert all(n <= (2 if in_flight and job == ids[0] else 1) for job, n in copies.items()), copies
    if point in ("queued", "denoise"):
        assert all(n == 1 for n in copies.values())

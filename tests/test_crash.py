"""Real crashes: ``python -m bot`` is SIGKILLed at chosen moments against the fake Telegram and the
fake Discord, then restarted.

Each test starts the bot on the tiny model with one platform, kills it with SIGKILL at one point
of a job's life (queued, mid-denoise, after the PNG was saved, after the platform acted on the
upload but before the database heard of it), starts it again on the same database and output
folder, and checks: every job delivered, none lost; each user's ledger adds up to what their
delivered jobs cost, with one commit per job; and a second copy of a result only where a send was
in flight at the kill: exactly one at 'answered', where the fake acts on the upload and holds its
answer past the kill (the database never hears of that delivery, so the restart sends it again).
On Discord a result is an edit of the interaction's message while its token lives, so the
repeated send edits the same message: one result message per job all the same.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from adapters.telegram import parse_callback
from tests.botprocess import (
    BotProcess,
    check_books,
    crash,
    discord_env,
    mid_draw_text,
    restart_until_delivered,
    telegram_env,
)
from tests.fakes.discord_server import FakeDiscord, FakeInteraction, RecordedRequest, rendered
from tests.fakes.telegram_server import ApiCall, FakeTelegram, Limit
from tests.test_shutdown import _loopback_without_proxy, mid_draw  # noqa: F401  (a fixture)

ALICE = FakeTelegram.user(21, "Alice", "alice")
BOB = FakeTelegram.user(22, "Bob", "bob")
GROUP = -100_333
#: a job long enough to be caught drawing; in a quiet group its status is edited after every step
SLOW = "a slow fox --steps 50"
QUICK = "a quick fox"
POINTS = ["queued", "denoise", "saved", "answered"]
#: every job's settings in these tests (a job costs a few credits; nobody runs out)
ENV = {"SHUTDOWN_GRACE": "300", "DAILY_CREDITS": "100", "MAX_STEPS": "300"}


# ---------------------------------------------------------------------------------- Telegram


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    # The bot keeps Telegram's 20-a-minute group budget itself, but a restarted process cannot know
    # what the killed one spent: the fake does not hold that against it (no 429 wait in these tests).
    async with FakeTelegram(group_limit=Limit(calls=1000, window=60.0)) as fake:
        yield fake


def to(chat: dict[str, object]) -> Callable[[ApiCall], bool]:
    return lambda call: call.chat_id == chat["id"]


def photo_job(call: ApiCall) -> str:
    """The job id a delivered photo's buttons carry."""
    markup = call.params.get("reply_markup") or {}
    for button in (b for row in markup.get("inline_keyboard", []) for b in row):
        parsed = parse_callback(button.get("callback_data"))
        if parsed is not None:
            return parsed[1]
    return f"?{call.seq}"


@pytest.mark.parametrize("point", POINTS)
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
    # 'answered': Telegram posts the photo, and its answer is held until after the kill
    upload = tg.hold("sendPhoto", chat_id=alice["id"], applied=True) if point == "answered" else None

    async def reach() -> int:
        tg.inject_message(alice, ALICE, f"/draw {SLOW if slow else QUICK}")
        if point == "queued":
            await tg.wait_for("editMessageText", lambda c: mid_draw(c) and c.chat_id == alice["id"])
            tg.inject_message(bob, BOB, "/draw a queued cat")  # waits behind Alice's job
            await tg.wait_for("sendMessage", to(bob))
            return 2
        if point == "denoise":
            await tg.wait_for("editMessageText", mid_draw)
        elif point == "saved":
            # sent only after the PNG is written and the row says "delivering"; the upload follows at once
            await tg.wait_for("sendChatAction", to(alice))
        else:
            assert upload is not None
            await asyncio.wait_for(upload.arrived.wait(), 120)  # posted; the bot has not heard
        return 1

    env = telegram_env(tg)
    try:
        draws = await crash(BotProcess(tmp_path, tiny_model_dir, env, **ENV), reach)
    finally:
        if upload is not None:
            upload.release()  # to nobody: the process is gone
    db = tmp_path / "bot.sqlite3"
    ids = await restart_until_delivered(BotProcess(tmp_path, tiny_model_dir, env, **ENV), db, draws)

    states = check_books(db)
    assert set(states.values()) == {"delivered"}, states
    copies = Counter(photo_job(c) for c in tg.calls_of("sendPhoto", ok=True))
    if point == "answered":  # the photo Telegram posted before the kill, and once more after it
        assert upload is not None and upload.call is not None and photo_job(upload.call) == ids[0]
        assert copies == {job: 2 if job == ids[0] else 1 for job in ids}, copies
    elif point == "saved":  # the upload follows the chat action at once: it may have been under way
        assert set(copies) == set(ids) and copies[ids[0]] <= 2, copies
        assert all(copies[job] == 1 for job in ids[1:]), copies
    else:
        assert copies == dict.fromkeys(ids, 1), copies


# ---------------------------------------------------------------------------------- Discord

#: an edit through an interaction's webhook: its status, and finally its result
WEBHOOK_EDIT = r"/webhooks/\d+/[^/]+/messages/\d+"
#: an interaction's status is edited at most 5 times in 2 s: a job drawn for a few seconds is
#: still drawing when its first progress edit (or another job's first status) arrives
SLOWER = "a slow fox --steps 300"


@pytest.fixture
async def dc() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as fake:
        yield fake
        assert not fake.errors, fake.errors
        assert not [r for r in fake.requests if r.unknown_route], "the bot called a route the fake lacks"


def drawing(interaction: FakeInteraction) -> Callable[[RecordedRequest], bool]:
    """A progress edit of the interaction's message from the middle of the drawing."""
    return lambda r: (
        interaction.token in r.path and mid_draw_text(rendered(str((r.json or {}).get("content"))))
    )


def job_of(payload: object) -> str | None:
    """The job id a message's buttons carry (``bb:<action>:<job>``)."""
    ids = FakeDiscord.custom_ids(payload) if isinstance(payload, dict) else []
    return next((cid.split(":")[2] for cid in ids if cid.startswith("bb:") and cid.count(":") == 2), None)


@pytest.mark.parametrize("point", ["denoise+queued", "saved", "answered"])
async def test_discord_sigkill_then_restart_delivers_everything_and_the_books_add_up(
    dc: FakeDiscord,
    tmp_path: Path,
    tiny_model_dir: Path,
    point: str,
) -> None:
    alice, bob = dc.add_user("alice"), dc.add_user("bob")
    # a channel of its own, so Bob's job gets its own "queued" status (in a busy channel it waits silently)
    studio = dc.add_channel("studio")
    drawing_at_kill = point == "denoise+queued"
    # the result's upload: held before Discord sees it (then lost, as a crash loses a send in
    # flight), or held after Discord edited the message, its answer never reaching the bot
    upload = None if drawing_at_kill else dc.hold(
        "PATCH", WEBHOOK_EDIT, where=lambda r: bool(r.files), applied=point == "answered"
    )  # fmt: skip
    draws: list[FakeInteraction] = []

    async def reach() -> int:
        if drawing_at_kill:  # one kill for two points, to keep the test short: one job
            # mid-denoise, another queued behind it
            draws.append(await dc.slash("draw", alice, prompt=SLOWER))
            await dc.wait_for_request("PATCH", WEBHOOK_EDIT, where=drawing(draws[0]), timeout=120)
            queued = await dc.slash("draw", bob, prompt="a queued cat", channel=studio)
            draws.append(queued)
            # its "queued" status edit follows the job's row
            await dc.wait_for_request(
                "PATCH", WEBHOOK_EDIT, where=lambda r: queued.token in r.path, timeout=120
            )
        else:  # the PNG is saved and the row says "delivering" before the upload starts
            assert upload is not None
            draws.append(await dc.slash("draw", alice, prompt=QUICK))
            await asyncio.wait_for(upload.arrived.wait(), 120)
        return len(draws)

    env = discord_env(dc)
    try:
        accepted = await crash(BotProcess(tmp_path, tiny_model_dir, env, **ENV), reach)
    finally:
        if upload is not None and point == "saved":
            upload.drop()
        elif upload is not None:
            upload.release()
    if drawing_at_kill:
        assert not [r for r in dc.requests if r.files]  # Alice's job was still drawing at the kill
    db = tmp_path / "bot.sqlite3"
    ids = await restart_until_delivered(BotProcess(tmp_path, tiny_model_dir, env, **ENV), db, accepted)

    states = check_books(db)
    assert set(states.values()) == {"delivered"}, states
    uploads = Counter(
        job_of(r.json) for r in dc.requests if r.files and 200 <= r.status < 300 and not r.dropped
    )
    # only the upload Discord acted on before the kill is sent again
    assert uploads == {job: 2 if point == "answered" else 1 for job in ids}, uploads
    for job_id, interaction in zip(ids, draws, strict=True):
        # one result per job, in the interaction's own message (its token still lives)
        results = [m for m in dc.messages.values() if m["attachments"] and job_of(m) == job_id]
        assert [int(m["id"]) for m in results] == [interaction.original_message_id], results

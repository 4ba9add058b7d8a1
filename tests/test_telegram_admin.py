"""Who may run which admin command on Telegram: every admin command from every kind of caller.

An admin (by ``ADMIN_IDS``) gets the command's answer in a group and in a private chat; a plain
member, a banned member and a member in a private chat get "Only bot admins can do that" and
nothing changes; a member of a group outside ``TELEGRAM_ALLOWED_CHATS`` gets no answer at all
and nothing changes. "Nothing changes" is read from the database file itself: users, usage,
ledger and jobs, row for row.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.config import Settings
from bot.domain import UserRef
from tests.fakes.telegram_server import FakeTelegram
from tests.test_telegram import ADA, ALICE, BOB, GROUP, TEST_GROUP_LIMIT, GatedWorker, Harness, make_settings

CAROL = FakeTelegram.user(13, "Carol", "carol")  # banned before the test
OTHER_GROUP = -100_333
#: each admin command (aimed at Alice by her numeric id, so no lookup is needed) and how its answer begins
COMMANDS = {
    "/quota show 11": "telegram:11",
    "/quota set 11 5": "Allowance set to 5.",
    "/quota grant 11 3": "Granted +3.",
    "/quota reset 11": "Usage reset.",
    "/ban 11": "telegram:11 is banned from drawing.",
    "/unban 11": "telegram:11 may draw again.",
    "/weight 11 2": "telegram:11 now has weight 2",
    "/stats": "queued: 0",
}
#: the commands that change the database when an admin runs them
CHANGING = set(COMMANDS) - {"/quota show 11", "/stats"}
REFUSAL = "Only bot admins can do that"


def snapshot(
    db: Path, caller: dict[str, Any], platform: str = "telegram"
) -> dict[str, list[tuple[Any, ...]]]:
    """Every row the bot keeps about people and credits, read from the file; the caller's own
    user row is left out (the bot remembers when it last saw whoever sends it a command)."""
    with sqlite3.connect(db) as conn:
        rows = {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
            for table in ("usage", "ledger", "jobs")
        }
        rows["users"] = conn.execute(
            "SELECT * FROM users WHERE NOT (platform = ? AND id = ?) ORDER BY rowid",
            (platform, str(caller["id"])),
        ).fetchall()
        return rows


@pytest.fixture(autouse=True)
def _loopback_without_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("PTB_TIMEDELTA", "1")


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram(group_limit=TEST_GROUP_LIMIT) as fake:
        yield fake


async def opened(tg: FakeTelegram, tiny_settings: Settings, tiny_worker: Any, **overrides: Any) -> Harness:
    harness = Harness(tg, make_settings(tiny_settings, tg, **overrides), GatedWorker(tiny_worker))
    await harness.open()
    await harness.service.admin_ban(UserRef(platform="telegram", id=str(ADA["id"])), UserRef(
        platform="telegram", id=str(CAROL["id"])), True)  # fmt: skip
    await harness.say(tg.group(GROUP, "artists"), ALICE, "/credits")  # Alice has a row
    return harness


@pytest.mark.parametrize(
    ("caller", "where"),
    [("admin", "group"), ("admin", "private")],
)
async def test_admins_get_every_admin_command_in_groups_and_private_chats(
    tg: FakeTelegram, tiny_settings: Settings, tiny_worker: Any, caller: str, where: str
) -> None:
    h = await opened(tg, tiny_settings, tiny_worker)
    try:
        chat = tg.group(GROUP, "artists") if where == "group" else tg.private_chat(ADA)
        for text, answer in COMMANDS.items():
            before = snapshot(h.settings.db_path, ADA)
            sent = len(h.replies(chat["id"]))
            await h.say(chat, ADA, text)
            replies = h.replies(chat["id"])[sent:]
            assert len(replies) == 1 and answer in replies[0], (text, replies)
            after = snapshot(h.settings.db_path, ADA)
            assert (after != before) == (text in CHANGING), (text, before, after)
    finally:
        await h.close()


@pytest.mark.parametrize(
    ("caller", "where"),
    [("member", "group"), ("banned", "group"), ("member", "private"), ("member", "another group")],
)
async def test_everyone_else_is_refused_or_ignored_and_nothing_changes(
    tg: FakeTelegram, tiny_settings: Settings, tiny_worker: Any, caller: str, where: str
) -> None:
    # outside the allowed chats the bot says nothing at all (only admins keep their private chat)
    allowed = {"telegram_allowed_chats": [GROUP]} if where == "another group" else {}
    h = await opened(tg, tiny_settings, tiny_worker, **allowed)
    try:
        user = CAROL if caller == "banned" else BOB
        chat = {
            "group": tg.group(GROUP, "artists"),
            "private": tg.private_chat(user),
            "another group": tg.group(OTHER_GROUP, "elsewhere"),
        }[where]
        before = snapshot(h.settings.db_path, user)
        for text in COMMANDS:
            sent = len(h.replies(chat["id"]))
            await h.say(chat, user, text)
            replies = h.replies(chat["id"])[sent:]
            assert replies == ([] if where == "another group" else [REFUSAL]), (text, replies)
        assert snapshot(h.settings.db_path, user) == before
        if where == "another group":
            assert [c for c in tg.calls if c.chat_id == OTHER_GROUP] == []
    finally:
        await h.close()

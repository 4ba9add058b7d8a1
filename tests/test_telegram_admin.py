"""Who may run which admin command on Telegram: every admin command from every kind of caller.

Callers: an admin by ``ADMIN_IDS`` (Telegram has no permission that makes admins: a group's
own admins are plain members to the bot), a plain member and a banned member. Chats: the bot's
group, a private chat, another group, and with ``TELEGRAM_ALLOWED_CHATS`` set another group
outside it and a private chat. An admin gets the command's answer everywhere the bot listens
(a private chat always); a member or a banned member gets "Only bot admins can do that" and
nothing changes; outside the allowed chats nobody but an admin in private gets any answer at all,
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


#: where a command is typed: the bot's group, a private chat with the bot, another group the bot
#: is in (every chat allowed), and with TELEGRAM_ALLOWED_CHATS set to the first group only: another
#: group outside it, and a private chat (kept for admins only)
PLACES = ("group", "private", "another group", "another group, not allowed", "private, allowlist set")
#: what each caller gets in each place: the answer, "Only bot admins can do that", or no reply at all
EXPECTED = {
    "admin": ("answered", "answered", "answered", "ignored", "answered"),
    "member": ("refused", "refused", "refused", "ignored", "ignored"),
    "banned": ("refused", "refused", "refused", "ignored", "ignored"),
}
MATRIX = [
    (caller, where, outcome)
    for caller, row in EXPECTED.items()
    for where, outcome in zip(PLACES, row, strict=True)
]


@pytest.mark.parametrize(("caller", "where", "outcome"), MATRIX)
async def test_every_admin_command_from_every_caller_in_every_chat(
    tg: FakeTelegram, tiny_settings: Settings, tiny_worker: Any, caller: str, where: str, outcome: str
) -> None:
    allowed = {"telegram_allowed_chats": [GROUP]} if where.endswith(("not allowed", "allowlist set")) else {}
    h = await opened(tg, tiny_settings, tiny_worker, **allowed)
    try:
        user = {"admin": ADA, "member": BOB, "banned": CAROL}[caller]
        chat = (
            tg.group(GROUP, "artists") if where == "group"
            else tg.group(OTHER_GROUP, "elsewhere") if where.startswith("another group")
            else tg.private_chat(user)
        )  # fmt: skip
        calls = len(tg.calls)
        for text, answer in COMMANDS.items():
            before = snapshot(h.settings.db_path, user)
            sent = len(h.replies(chat["id"]))
            await h.say(chat, user, text)
            replies = h.replies(chat["id"])[sent:]
            after = snapshot(h.settings.db_path, user)
            if outcome == "answered":
                assert len(replies) == 1 and answer in replies[0], (text, replies)
                assert (after != before) == (text in CHANGING), (text, before, after)
            else:
                assert replies == ([REFUSAL] if outcome == "refused" else []), (text, replies)
                assert after == before, text
        if outcome == "ignored":  # not a word to that chat, not even a "typing"
            assert [c for c in tg.calls[calls:] if c.chat_id == chat["id"]] == []
    finally:
        await h.close()

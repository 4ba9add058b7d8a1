"""Fuzzing the Telegram adapter through the fake Bot API: random commands, forged button
payloads and odd updates never crash it, every command of ours is answered (or ignored by
design), and a forged button changes nothing.

Hypothesis draws the inputs on a worker thread; each one is injected into the fake and
handled on the test's event loop, so the real python-telegram-bot client, service and SQLite
file take every input.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.config import Settings
from bot.domain import JobState
from tests.fakes.telegram_server import FakeTelegram
from tests.test_telegram import ALICE, BOB, GROUP, TEST_GROUP_LIMIT, GatedWorker, Harness, make_settings, ref
from tests.test_telegram_admin import snapshot

ANONYMOUS_ADMIN = FakeTelegram.user(1087968824, "Group", "GroupAnonymousBot") | {"is_bot": True}
COMMANDS = ["draw", "credits", "jobs", "queue", "cancel", "help", "start", "quota", "ban", "unban",
            "weight", "stats"]  # fmt: skip
FLAGS = [
    "--seed",
    "--ar",
    "--size",
    "--n",
    "--steps",
    "--no",
    "--cfg",
    "--strength",
    "--image",
    "--",
    "—seed",
]
#: text that is hard on parsers: right-to-left marks, zero-width joiners, emoji, NULs, lone surrogates' cousins
WORDS = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), min_size=0, max_size=40
)
#: Telegram's message limit is 4096 characters; ten times over is drawn too
LONG = st.integers(min_value=1, max_value=40960).map(lambda n: "ж" * n)


@st.composite
def command_texts(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(COMMANDS))
    target = draw(
        st.sampled_from(["", "", "@brushbot_test_bot", "@BrushBot_Test_Bot", "@some_other_bot", "@"])
    )
    parts = draw(
        st.lists(
            st.one_of(
                WORDS,
                st.sampled_from(FLAGS),
                st.integers(min_value=-(2**70), max_value=2**70).map(str),
                st.sampled_from(["16:9", "0:0", "99999x99999", "nan", "inf", "1e308", "-0", "@alice", "11"]),
                LONG,
            ),
            max_size=6,
        )
    )
    return f"/{name}{target} " + " ".join(parts)


FORGED = st.one_of(
    st.sampled_from(["bb", "bb:", "bb::", "bb:reroll:", "bb:reroll", "bb:x:y", "bb:png:../../etc/passwd"]),
    st.builds(
        lambda action, ident: f"bb:{action}:{ident}",
        st.sampled_from(["reroll", "png", "del", "cancel", "subtle", "strong", "nope"]),
        st.one_of(st.just("OTHER"), st.just("UNKNOWN"), st.text(max_size=60)),
    ),
)


def odd_update(kind: str, chat: dict[str, Any], text: str) -> dict[str, Any]:
    """Updates a bot meets in the wild that carry a command but no one to charge for it."""
    message: dict[str, Any] = {"message_id": 9_000_000, "date": int(time.time()), "chat": chat, "text": text}
    if text.startswith("/"):
        message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]
    if kind == "edited":
        return {"edited_message": message | {"from": ALICE, "edit_date": int(time.time())}}
    if kind == "channel post":
        return {"channel_post": message | {"chat": {"id": -100_777, "type": "channel", "title": "news"}}}
    if kind == "anonymous admin":
        return {"message": message | {"from": ANONYMOUS_ADMIN, "sender_chat": chat}}
    if kind == "forwarded":
        origin = {"type": "user", "date": int(time.time()), "sender_user": BOB}
        return {"message": message | {"from": ALICE, "forward_origin": origin}}
    return {"message": message}  # no sender at all


ACTIONS = st.one_of(
    st.tuples(st.just("command"), st.sampled_from(["group", "private"]), command_texts()),
    st.tuples(st.just("forged"), st.sampled_from(["group", "private"]), FORGED),
    st.tuples(
        st.just("odd"),
        st.sampled_from(["edited", "channel post", "anonymous admin", "forwarded", "no sender"]),
        command_texts(),
    ),
)


@pytest.fixture(autouse=True)
def _loopback_without_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("PTB_TIMEDELTA", "1")


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram(group_limit=TEST_GROUP_LIMIT) as fake:
        yield fake


async def test_random_commands_forged_buttons_and_odd_updates_never_break_the_bot(
    tg: FakeTelegram, tiny_settings: Settings, tiny_worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # few credits, so most draws are refused in one line instead of keeping the GPU busy
    h = Harness(tg, make_settings(tiny_settings, tg, daily_credits=3), GatedWorker(tiny_worker))
    await h.open()
    loop = asyncio.get_running_loop()
    group, private = tg.group(GROUP, "artists"), tg.private_chat(BOB)
    chats = {"group": group, "private": private}
    try:
        # a finished job of Alice's in her private chat: its id is what a forger would name
        await h.say(tg.private_chat(ALICE), ALICE, "/draw a secret --seed 1")
        await tg.wait_for("sendPhoto")
        await h.settled()
        [secret] = await h.store.user_jobs(ref(ALICE))
        caplog.set_level(logging.WARNING)

        performed: list[str] = []

        async def perform(action: tuple[str, str, str]) -> None:
            kind, where, text = action
            performed.append(kind)
            if kind == "command":
                chat = chats[where]
                before = len([c for c in tg.calls if c.chat_id == chat["id"]])
                await h.say(chat, BOB, text)
                await h.service.status.flushed()
                after = len([c for c in tg.calls if c.chat_id == chat["id"]])
                first = text.split()[0]
                if "@" not in first or first.partition("@")[2].lower() == tg.bot_username.lower():
                    assert after > before, f"no answer to {text[:80]!r}"
                else:
                    assert after == before, f"answered {text[:80]!r}, meant for another bot"
            elif kind == "forged":
                data = text.replace("OTHER", secret.id).replace("UNKNOWN", "0" * 16)
                if len(data.encode()) > 64:  # Telegram never delivers longer callback data
                    data = data.encode()[:64].decode(errors="ignore")
                rows = snapshot(h.settings.db_path, BOB)
                status = await h.store.get_job(secret.id)
                shown = tg.bot_messages(chats[where]["id"])
                anchor = shown[-1].message_id if shown else 1
                query = tg.inject_callback(BOB, chats[where]["id"], anchor, data)
                await h.handled()
                assert tg.answer(query) is not None, f"button {data!r} not answered"
                assert snapshot(h.settings.db_path, BOB) == rows, f"button {data!r} changed the database"
                assert await h.store.get_job(secret.id) == status
            else:
                rows = snapshot(h.settings.db_path, BOB)
                calls = len(tg.calls)
                tg.inject_update(odd_update(kind, group, text))
                await h.handled()
                assert snapshot(h.settings.db_path, BOB) == rows, f"{kind} update changed the database"
                assert not [c for c in tg.calls[calls:] if c.method not in ("getUpdates",)], kind

        def run(coro: Coroutine[Any, Any, None]) -> None:
            asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=120)

        @settings(
            max_examples=40, deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )  # fmt: skip
        @given(actions=st.lists(ACTIONS, min_size=1, max_size=3))
        def check(actions: list[tuple[str, str, str]]) -> None:
            for action in actions:
                run(perform(action))

        await asyncio.to_thread(check)
        assert len(performed) >= 40 and set(performed) == {"command", "forged", "odd"}, performed
        await h.settled()
        crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not crashes, [r.getMessage() for r in crashes]
        # every job ended in a recorded state and Alice's secret was neither redrawn nor shown
        for job in await h.store.user_jobs(ref(BOB)):
            assert job.state in (JobState.DELIVERED, JobState.FAILED, JobState.CANCELLED), job
            assert job.request.prompt != "a secret"
        assert [c for c in tg.calls if c.chat_id in (GROUP, BOB["id"]) and "a secret" in str(c.params)] == []
    finally:
        await h.close()

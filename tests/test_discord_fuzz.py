"""The Discord adapter against hostile and unlucky input, through the fake Discord:

* the authorization matrix: every ``/brush`` command from an admin by ``ADMIN_IDS``, an admin by
  ``DISCORD_ADMIN_PERMISSION``, a plain member and a banned member, in the operator's server
  (``DISCORD_GUILD_ID``), in another server that invited the bot, and in a DM — ``ADMIN_IDS``
  admins get the answer everywhere, a permission makes an admin only in the operator's server
  (not the owner of another server, not in a DM), everyone else gets "Only bot admins can do
  that" and not one database row changes;
* fuzzing: random commands (unicode, flags, lengths up to the option limits), forged button
  ids (another channel's job, unknown jobs, malformed ids) — every interaction acknowledged in
  time, nothing logged as a crash, no state changed by a forged button, no job of another channel
  shown or redrawn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.discord.commands import MAX_OPTION_STRING
from bot import messages
from bot.config import Settings
from bot.domain import JobState, UserRef
from generation.worker import Worker
from tests.fakes.discord_server import MANAGE_GUILD, MEMBER_PERMISSIONS, FakeChannel, FakeDiscord, FakeUser
from tests.test_discord import TOKEN, Bot, bot_on, ephemeral_answer, result_of
from tests.test_telegram_admin import snapshot

#: each admin command, its options (aimed at ``target``), and how an admin's answer begins
ADMIN_CALLS: list[tuple[str, dict[str, Any], str]] = [
    ("brush quota show", {}, "(discord:"),
    ("brush quota set", {"credits": 5}, "5 credit(s) available"),
    ("brush quota grant", {"credits": 3}, "credit(s) available"),
    ("brush quota reset", {}, "Usage reset"),
    ("brush ban", {}, "is banned"),
    ("brush unban", {}, "may draw again"),
    ("brush weight", {"weight": 2.5}, "weight 2.5"),
    ("brush stats", {}, "queued: 0"),
]
CHANGING = {
    "brush quota set",
    "brush quota grant",
    "brush quota reset",
    "brush ban",
    "brush unban",
    "brush weight",
}
REFUSAL = "Only bot admins can do that"
#: where a command is typed: the operator's server (DISCORD_GUILD_ID), another server the bot was
#: invited to, a DM with the bot (where Discord does not offer the guild-only /brush: forged)
HOME, OTHER, DM = "our server", "another server", "a DM"


def ref(user: FakeUser) -> UserRef:
    return UserRef(platform="discord", id=str(user.id))


def rows(bot: Bot, user: FakeUser) -> dict[str, list[tuple[Any, ...]]]:
    return snapshot(bot.settings.db_path, {"id": user.id}, platform="discord")


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(token=TOKEN) as server:
        server.add_channel("secret")
        server.add_channel("room")  # before the bot connects, so it sees them
        # another server invited the bot; its owner holds every permission there
        elsewhere = server.add_guild("Elsewhere", owner=server.add_user("stranger"))
        server.add_channel("lobby", guild=elsewhere)
        yield server
        assert not server.errors, server.errors
        assert not server.rate_limited, [f"{r.method} {r.path}" for r in server.rate_limited]


@pytest.fixture
async def bot(fake: FakeDiscord, tiny_settings: Settings, tiny_worker: Worker) -> AsyncIterator[Bot]:
    """The bot with manage_guild making admins in its operator's server. An earlier start without
    DISCORD_GUILD_ID synced the commands globally, so every server the bot is in offers /brush."""
    earlier = bot_on(fake, tiny_settings, tiny_worker, daily_credits=3)
    await earlier.start()
    await earlier.stop()
    assert any(c["name"] == "brush" for c in fake.commands[None])
    stack = bot_on(fake, tiny_settings, tiny_worker, discord_admin_permission="manage_guild",
                   discord_guild_id=fake.guild_id, daily_credits=3)  # fmt: skip
    await stack.start()
    try:
        yield stack
    finally:
        await stack.stop()


async def caller_in(fake: FakeDiscord, bot: Bot, caller: str, where: str) -> tuple[FakeUser, FakeChannel]:
    """The person ``caller`` names, and the channel they type in (``HOME``, ``OTHER`` or ``DM``)."""
    elsewhere = next(iter(fake.guilds.values()))
    if caller == "admin by ADMIN_IDS":
        user = fake.owner
    elif caller == "admin by permission":  # holds manage_guild in our server
        user = fake.add_user("manager", permissions=MEMBER_PERMISSIONS | MANAGE_GUILD)
    elif caller == "owner of that server":
        user = next(u for u in fake.users.values() if u.id == elsewhere.owner_id)
    else:
        user = fake.add_user("member")
        if caller == "banned member":
            await bot.svc.admin_ban(ref(fake.owner), ref(user), True)
    if where == OTHER:
        if user.id != elsewhere.owner_id:
            fake.join(elsewhere, user)  # a plain member there
        return user, next(c for c in fake.channels.values() if c.name == "lobby")
    return user, fake.dm_channel(user) if where == DM else fake.general


async def admin_call(
    fake: FakeDiscord, command: str, user: FakeUser, channel: FakeChannel, target: FakeUser, **options: Any
) -> str:
    """Run an admin command (forged in a DM, where Discord does not offer it); its private answer."""
    if command != "brush stats":
        options["user"] = target
    it = await fake.slash(command, user, channel=channel, forged=channel.guild_id is None, **options)
    return await ephemeral_answer(fake, it)


@pytest.mark.parametrize(
    ("caller", "where"),
    [("admin by ADMIN_IDS", HOME), ("admin by permission", HOME), ("admin by ADMIN_IDS", OTHER),
     ("admin by ADMIN_IDS", DM)],
)  # fmt: skip
async def test_admins_get_every_admin_command(fake: FakeDiscord, bot: Bot, caller: str, where: str) -> None:
    target = fake.add_user("target")
    await ephemeral_answer(fake, await fake.slash("credits", target))  # the target has a row
    admin, channel = await caller_in(fake, bot, caller, where)
    for command, options, answer in ADMIN_CALLS:
        before = rows(bot, admin)
        line = await admin_call(fake, command, admin, channel, target, **options)
        assert answer in line, (command, line)
        after = rows(bot, admin)
        if command in CHANGING:
            assert after != before, command
        else:  # looking may file the target's users row; it writes no credit, usage or job
            assert {k: after[k] for k in ("usage", "ledger", "jobs")} == {
                k: before[k] for k in ("usage", "ledger", "jobs")
            }, command


@pytest.mark.parametrize(
    ("caller", "where"),
    [
        ("plain member", HOME),
        ("banned member", HOME),
        ("owner of that server", OTHER),  # every permission there: credits are global, so no admin
        ("admin by permission", OTHER),  # manage_guild in our server counts in our server only
        ("plain member", OTHER),
        ("admin by permission", DM),  # a DM says nothing about anyone's permissions
        ("plain member", DM),
    ],
)
async def test_everyone_else_is_refused_and_nothing_changes(
    fake: FakeDiscord, bot: Bot, caller: str, where: str
) -> None:
    target = fake.add_user("target")
    await ephemeral_answer(fake, await fake.slash("credits", target))
    member, channel = await caller_in(fake, bot, caller, where)
    before = rows(bot, member)
    for command, options, _ in ADMIN_CALLS:
        assert await admin_call(fake, command, member, channel, target, **options) == REFUSAL, command
    assert rows(bot, member) == before


# --------------------------------------------------------------------------------- fuzzing

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
    "—seed",
    "--",
]
WORDS = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=30)
PROMPTS = st.lists(
    st.one_of(
        WORDS,
        st.sampled_from(FLAGS),
        st.integers(min_value=-(2**70), max_value=2**70).map(str),
        st.sampled_from(
            ["16:9", "0:0", "99999x99999", "nan", "inf", "@everyone", "<@1>", "[x](https://e.x)"]
        ),
        st.integers(min_value=1, max_value=MAX_OPTION_STRING).map(lambda n: "ж" * n),
    ),
    min_size=1,
    max_size=5,
).map(lambda parts: " ".join(parts)[:MAX_OPTION_STRING] or "x")
FORGED = st.one_of(
    st.sampled_from(["bb", "bb:", "bb::", "bb:reroll:", "garbage", "bb:info:../../etc/passwd"]),
    st.builds(
        lambda action, ident: f"bb:{action}:{ident}"[:100],
        st.sampled_from(["reroll", "info", "delete", "cancel", "edit", "subtle", "strong", "nope"]),
        st.one_of(st.just("OTHER"), st.just("UNKNOWN"), st.text(max_size=40)),
    ),
)
ACTIONS = st.one_of(
    st.tuples(st.just("draw"), PROMPTS),
    st.tuples(st.sampled_from(["credits", "jobs", "queue", "help"]), st.just("")),
    st.tuples(st.just("cancel"), st.one_of(st.just(""), st.text(max_size=30))),
    st.tuples(st.just("forged"), FORGED),
)


async def test_random_commands_and_forged_buttons_never_break_the_bot(
    fake: FakeDiscord, bot: Bot, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    secret_room, room = (next(c for c in fake.channels.values() if c.name == n) for n in ("secret", "room"))
    # a finished job of Alice's in another channel: its id is what a forger would name
    it = await fake.wait_response(
        await fake.slash("draw", alice, prompt="a secret plan --seed 1", channel=secret_room)
    )
    await result_of(fake, it.original_message_id)
    [secret] = await bot.svc.store.user_jobs(ref(alice))
    await bot.wait_state(secret.id, JobState.DELIVERED)
    anchor = fake.post_as(bob, room, "hello")
    caplog.set_level(logging.WARNING)
    performed: list[str] = []

    async def perform(action: tuple[str, str]) -> None:
        kind, text = action
        performed.append(kind)
        if kind == "forged":
            custom_id = text.replace("OTHER", secret.id).replace("UNKNOWN", "0" * 16)
            async with asyncio.timeout(60):  # bob's own earlier jobs settle first
                await bot.svc.wait_idle()
            before, state = rows(bot, bob), await bot.svc.store.get_job(secret.id)
            press = await fake.forge_click(anchor, custom_id, bob)
            await fake.wait_response(press)
            assert press.callback_status == 200, (custom_id, press.callback)
            await asyncio.sleep(0.05)  # anything a press set off has started
            assert rows(bot, bob) == before, f"button {custom_id!r} changed the database"
            assert await bot.svc.store.get_job(secret.id) == state
            return
        options = {"prompt": text} if kind == "draw" else ({"job": text} if kind == "cancel" and text else {})
        it = await fake.slash(kind, bob, channel=room, **options)
        await fake.wait_response(it)
        assert it.callback_status == 200, (kind, text[:80], it.callback)

        def answered() -> bool:  # beyond the acknowledgement: a ticket, a result or a line
            own = fake.messages.get(it.original_message_id or 0) or {}
            followups = [
                m for m in fake.messages.values()
                if (m.get("interaction_metadata") or {}).get("id") == str(it.id) and m.get("content")
            ]  # fmt: skip
            return bool(own.get("content") or own.get("attachments") or followups)

        await fake.wait_until(answered)

    def run(coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=120)

    @settings(
        max_examples=30, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )  # fmt: skip
    @given(actions=st.lists(ACTIONS, min_size=1, max_size=3))
    def check(actions: list[tuple[str, str]]) -> None:
        for action in actions:
            run(perform(action))

    await asyncio.to_thread(check)
    assert len(performed) >= 30 and {"draw", "forged", "cancel"} <= set(performed), performed
    async with asyncio.timeout(60):
        await bot.svc.wait_idle()
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not crashes, [r.getMessage() for r in crashes]
    for job in await bot.svc.store.user_jobs(ref(bob)):
        assert job.state in (JobState.DELIVERED, JobState.FAILED, JobState.CANCELLED), job
        assert "a secret plan" not in job.request.prompt
    shown = [m for m in fake.messages.values() if str(m.get("channel_id")) == str(room.id)]
    assert not [m for m in shown if "a secret plan" in str(m.get("content", ""))]
    assert messages.NOT_THIS_CHAT  # the line a forged press of another channel's job gets

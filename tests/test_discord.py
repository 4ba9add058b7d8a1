"""The Discord adapter end to end: real discord.py, service, SQLite and tiny model against a fake Discord."""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from adapters.discord import FIELD_TOKEN, REDACTED_LOGGERS, URL_TOKEN, DiscordAdapter
from adapters.discord.buttons import RESULT_ACTIONS
from bot import messages
from bot.config import Settings
from bot.domain import VARY_STRONG, VARY_SUBTLE, JobState, LedgerKind, UserRef
from bot.errors import ConfigError
from bot.logs import guard_logs
from bot.service import Service
from data import SqliteStore
from generation.images import ImageStore, read_parameters
from generation.loading import load_pipeline
from generation.sources import SourceStore
from generation.worker import Worker
from tests.fakes.discord_server import (
    CHANNEL_MESSAGE,
    DEFERRED_CHANNEL_MESSAGE,
    EPHEMERAL,
    MANAGE_GUILD,
    MEMBER_PERMISSIONS,
    MODAL,
    Bucket,
    FakeDiscord,
    FakeInteraction,
    FakeUser,
    rendered,
)
from tests.leaks import SECRETS, register_secret
from tests.support import png_header_only

TOKEN = register_secret("bot-token-Zm9vYmFyYmF6cXV4LnNlY3JldC5kaXNjb3JkLnRva2Vu", "test_discord TOKEN")
WEBHOOK_EDIT = r"/webhooks/\d+/[^/]+/messages/\d+"
WEBHOOK_ROUTE = "PATCH /webhooks/{webhook_id}/{webhook_token}/messages/{message_id}"


class Gate:
    """Wraps the tiny pipeline so a test decides when each generation may start."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._allowed = 10**9
        self.calls: list[str] = []  # prompts, in the order the worker thread started them
        self.entered = threading.Semaphore(0)

    def close(self) -> None:
        with self._cond:
            self._allowed = 0

    def allow(self, n: int = 10**9) -> None:
        with self._cond:
            self._allowed += n
            self._cond.notify_all()

    async def wait_entered(self) -> str:
        """Wait until the worker thread starts its next generation; return its prompt."""
        assert await asyncio.to_thread(self.entered.acquire, True, 20), "no generation started"
        return self.calls[-1]

    def factory(self, settings: Settings) -> tuple[Any, Any, Any]:
        pipe, profile, plan = load_pipeline(settings)
        return _GatedPipeline(pipe, self), profile, plan


class _GatedPipeline:
    def __init__(self, pipe: Any, gate: Gate) -> None:
        self._pipe = pipe
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        gate = self._gate
        with gate._cond:
            gate.calls.append(str(kwargs.get("prompt")))
            gate.entered.release()
            assert gate._cond.wait_for(lambda: gate._allowed > 0, timeout=30), "gate never opened"
            gate._allowed -= 1
        return self._pipe(*args, **kwargs)


@dataclass
class Bot:
    """The real stack on one database; ``restart()`` rebuilds everything but the worker and the fake."""

    fake: FakeDiscord
    settings: Settings
    worker: Worker
    token_lifetime: float = 15 * 60
    store: SqliteStore | None = None
    service: Service | None = None
    adapter: DiscordAdapter | None = None
    sink: ImageStore = field(init=False)

    def __post_init__(self) -> None:
        self.sink = ImageStore(self.settings.output_dir, self.worker.profile.name)

    async def start(self) -> Bot:
        self.store = SqliteStore(self.settings.db_path)
        await self.store.start()
        self.service = Service(
            settings=self.settings, store=self.store, workers=[self.worker], sink=self.sink,
            delivery_backoff=(0.01, 0.01), sources=SourceStore(self.settings.output_dir),
        )  # fmt: skip
        await self.service.start()
        self.adapter = DiscordAdapter(
            self.service, self.settings, token_lifetime=self.token_lifetime, guild_ready_timeout=0.02
        )
        await self.adapter.start()
        await self.service.recover()
        return self

    async def stop(self) -> None:
        # the service first: a job finishing meanwhile stays in the store instead of meeting a closed chat
        if self.service is not None:
            await self.service.close()
        if self.adapter is not None:
            await self.adapter.close()
        if self.store is not None:
            await self.store.close()
        self.adapter = self.service = self.store = None

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    @property
    def svc(self) -> Service:
        assert self.service is not None
        return self.service

    async def job_state(self, job_id: str) -> JobState:
        assert self.store is not None
        job = await self.store.get_job(job_id)
        assert job is not None
        return job.state

    async def wait_state(self, job_id: str, state: JobState) -> None:
        for _ in range(2000):
            if await self.job_state(job_id) is state:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"job {job_id} never reached {state}")


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(token=TOKEN) as server:
        yield server
        assert not server.errors, server.errors
        assert not [r for r in server.requests if r.unknown_route], "the bot called a route the fake lacks"
        # discord.py kept within every bucket from the headers alone
        assert not server.rate_limited, [f"{r.method} {r.path}" for r in server.rate_limited]


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
async def worker(tiny_settings: Settings, gate: Gate) -> AsyncIterator[Worker]:
    async with Worker(tiny_settings, pipeline_factory=gate.factory) as w:
        try:
            yield w
        finally:
            gate.allow()


def bot_on(
    fake: FakeDiscord, tiny_settings: Settings, worker: Worker, *, token_lifetime: float = 15 * 60,
    **overrides: Any,
) -> Bot:  # fmt: skip
    """The stack (not started yet) against ``fake``."""
    update: dict[str, Any] = {
        "discord_token": SecretStr(TOKEN),
        "discord_api_base_url": fake.url,
        "discord_gateway_url": fake.gateway_url,
        "progress_interval": 0.1,
        "admin_ids": [f"discord:{fake.owner.id}"],
    }
    update.update(overrides)
    return Bot(fake=fake, settings=tiny_settings.model_copy(update=update), worker=worker,
               token_lifetime=token_lifetime)  # fmt: skip


@pytest.fixture
async def make_bot(
    fake: FakeDiscord, tiny_settings: Settings, worker: Worker
) -> AsyncIterator[Callable[..., Any]]:
    bots: list[Bot] = []

    async def make(*, token_lifetime: float = 15 * 60, **overrides: Any) -> Bot:
        bot = bot_on(fake, tiny_settings, worker, token_lifetime=token_lifetime, **overrides)
        bots.append(bot)
        return await bot.start()

    yield make
    for bot in bots:
        await bot.stop()


def job_id_of(text: str) -> str:
    """The job id in a status text such as ``Queued job 1a2b3c4d5e: ...``."""
    import re

    match = re.search(r"[Jj]ob ([0-9a-f]{10})", text)
    assert match, text
    return match.group(1)


async def draw(fake: FakeDiscord, user: FakeUser, **options: Any) -> tuple[FakeInteraction, dict[str, Any]]:
    """Run /draw, wait for the ticket; return the interaction and its status message."""
    it = await fake.slash("draw", user, **options)
    await fake.wait_response(it)
    assert it.callback_type == DEFERRED_CHANNEL_MESSAGE, it.callback
    mid = it.original_message_id
    assert mid is not None
    status = await fake.wait_until(
        lambda: "Queued job" in fake.messages[mid]["content"] and fake.messages[mid]
    )
    return it, dict(status)  # as it was then: the fake edits its messages in place


def content(fake: FakeDiscord, message_id: int | None) -> str:
    """The current text of a message ("" once deleted)."""
    assert message_id is not None
    return str(fake.messages.get(message_id, {}).get("content", ""))


async def result_of(fake: FakeDiscord, message_id: int | None) -> dict[str, Any]:
    """Wait until a message carries images; return it."""
    assert message_id is not None
    return await fake.wait_until(  # type: ignore[no-any-return]
        lambda: (
            message_id in fake.messages
            and fake.messages[message_id]["attachments"]
            and fake.messages[message_id]
        )
    )


async def ephemeral_answer(fake: FakeDiscord, it: FakeInteraction) -> str:
    """The text of the ephemeral answer to an interaction (direct reply or first follow-up)."""
    await fake.wait_response(it)

    def text() -> str | None:
        if it.callback_type == CHANNEL_MESSAGE:
            assert it.callback_data.get("flags", 0) & EPHEMERAL
            return str(it.callback_data["content"])
        msg = fake.messages.get(it.original_message_id or 0)
        if msg is not None and msg["content"]:
            assert msg["flags"] & EPHEMERAL
            return str(msg["content"])
        for msg in fake.messages.values():
            meta = msg.get("interaction_metadata") or {}
            if meta.get("id") == str(it.id) and msg["flags"] & EPHEMERAL and msg["content"]:
                return str(msg["content"])
        return None

    return rendered(await fake.wait_until(text))


# ---------------------------------------------------------------------- tests


async def test_draw_defers_shows_progress_and_uploads_the_saved_png(
    fake: FakeDiscord, make_bot: Callable[..., Any], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    bot = await make_bot()
    alice = fake.add_user("alice")

    # commands were synced with typed ranges, size choices and a hidden admin group
    commands = {c["name"]: c for c in fake.commands[None]}
    assert set(commands) == {"draw", "credits", "jobs", "queue", "cancel", "help", "brush", "Vary this image"}
    assert commands["Vary this image"]["type"] == 3  # a message command
    options = {o["name"]: o for o in commands["draw"]["options"]}
    assert options["steps"]["max_value"] == bot.settings.max_steps
    assert options["count"]["max_value"] == bot.settings.max_images
    assert [c["value"] for c in options["size"]["choices"]] == list(bot.svc.profile.sizes)
    assert commands["brush"]["default_member_permissions"] == str(MANAGE_GUILD)
    # no privileged intents (members 1<<1, presences 1<<8, message content 1<<15)
    assert fake.identifies[-1]["intents"] & ((1 << 1) | (1 << 8) | (1 << 15)) == 0
    assert fake.identifies[-1]["zlib_stream"]  # discord.py asked for a compressed gateway and got one

    it, status = await draw(fake, alice, prompt="a red fox in snow --seed 42", steps=4, size="portrait")
    # the very first answer was the defer, within the fake's 3-second deadline
    first = next(r for r in fake.requests if str(it.id) in r.path)
    assert first.path.endswith("/callback") and first.status == 200
    assert first.json["type"] == DEFERRED_CHANNEL_MESSAGE

    job_id = job_id_of(status["content"])
    assert "cost 1 credit(s)" in status["content"] and "left" in status["content"]
    assert fake.custom_ids(status) == [f"bb:cancel:{job_id}"]

    result = await result_of(fake, it.original_message_id)
    await bot.wait_state(job_id, JobState.DELIVERED)
    edits = [r for r in fake.find_requests("PATCH", WEBHOOK_EDIT) if it.token in r.path]
    progress = [r for r in edits if "Drawing job" in (r.json or {}).get("content", "")]
    assert progress and all("█" in r.json["content"] or "░" in r.json["content"] for r in progress)

    job = await bot.svc.job(job_id)
    assert job.seeds == (42,) and (job.request.width, job.request.height) == bot.svc.profile.sizes["portrait"]
    [(filename, data)] = fake.files_of(result)
    assert data == Path(job.outputs[0]).read_bytes()
    assert filename == Path(job.outputs[0]).name and "42" in filename
    uploaded = tmp_path / filename
    uploaded.write_bytes(data)
    meta = read_parameters(uploaded)  # the uploaded file itself carries its seed
    assert meta["seed"] == "42" and meta["brushbot"]["seed"] == 42
    for needle in ("a red fox in snow", "seed 42", "4 steps", "48x80", job.model):
        assert needle in result["content"]
    assert fake.custom_ids(result) == [f"bb:{a}:{job_id}" for a in RESULT_ACTIONS]

    # no token anywhere: not in the log (at DEBUG), not in any body the bot sent; the suite-wide
    # scan looks for both in every line (the fake registered them)
    assert TOKEN in SECRETS and it.token in SECRETS
    for record in caplog.records:
        line = record.getMessage()
        assert TOKEN not in line and it.token not in line, line
    assert all(TOKEN not in str(r.json) for r in fake.requests)


async def test_two_users_jobs_interleave_fairly(
    fake: FakeDiscord, make_bot: Callable[..., Any], gate: Gate
) -> None:
    # one channel each: a quiet channel shows each job's ticket (a busy one is tested below)
    rooms = [fake.add_channel(f"room{n}") for n in range(4)]
    await make_bot()
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    gate.close()
    first, _ = await draw(fake, alice, prompt="alice one", steps=1, channel=rooms[0])
    assert await gate.wait_entered() == "alice one"  # running, held at the gate
    await draw(fake, alice, prompt="alice two", steps=1, channel=rooms[1])
    await draw(fake, alice, prompt="alice three", steps=1, channel=rooms[2])
    bobs, bob_status = await draw(fake, bob, prompt="bob one", steps=1, channel=rooms[3])
    # bob waits behind at most the running job: ahead of alice's queued ones
    assert "next in line" in bob_status["content"] or "position 2 in" in bob_status["content"]
    gate.allow()
    for _ in range(3):
        await gate.wait_entered()
    assert gate.calls.index("bob one") < gate.calls.index("alice three"), gate.calls
    await result_of(fake, bobs.original_message_id)
    await result_of(fake, first.original_message_id)


def job_of(message: dict[str, Any]) -> str:
    """The job id carried by a message's buttons."""
    ids = [c for c in FakeDiscord.custom_ids(message) if c.startswith("bb:")]
    assert ids, message
    return ids[0].rsplit(":", 1)[1]


async def test_every_result_button_works_after_a_restart(
    fake: FakeDiscord, make_bot: Callable[..., Any]
) -> None:
    bot = await make_bot()
    alice, mallory = fake.add_user("alice"), fake.add_user("mallory")
    it, status = await draw(fake, alice, prompt="a lighthouse --seed 7", steps=1)
    job_id = job_id_of(status["content"])
    result = await result_of(fake, it.original_message_id)
    await bot.wait_state(job_id, JobState.DELIVERED)
    edit = await fake.click(result, f"bb:edit:{job_id}", alice)
    await fake.wait_response(edit)
    assert edit.callback_type == MODAL
    assert "a lighthouse" in str(edit.callback_data)  # the form starts from the old prompt

    await bot.restart()  # new adapter, service and store on the same database: nothing in memory survives

    info = await fake.click(result, f"bb:info:{job_id}", mallory)
    text = await ephemeral_answer(fake, info)
    assert "Prompt: a lighthouse" in text and "seed 7" in text and "delivered" in text

    denied = await fake.click(result, f"bb:delete:{job_id}", mallory)
    assert "Only the person who asked" in await ephemeral_answer(fake, denied)
    assert int(result["id"]) in fake.messages

    reroll = await fake.click(result, f"bb:reroll:{job_id}", alice)
    await fake.wait_response(reroll)
    assert reroll.callback_type == DEFERRED_CHANNEL_MESSAGE
    rerolled = await result_of(fake, reroll.original_message_id)
    again = await bot.svc.job(job_of(rerolled))
    assert again.id != job_id and again.request.prompt == "a lighthouse" and again.request.steps == 1
    assert again.seeds != (7,)

    # the form opened before the restart is submitted after it
    submitted = await fake.submit_modal(edit, {"prompt": "a lighthouse at night", "negative": ""})
    await fake.wait_response(submitted)
    assert submitted.callback_type == DEFERRED_CHANNEL_MESSAGE
    edited = await result_of(fake, submitted.original_message_id)
    changed = await bot.svc.job(job_of(edited))
    assert changed.request.prompt == "a lighthouse at night"
    assert changed.seeds == (7,) and changed.request.steps == 1  # only the prompt changed

    await fake.click(result, f"bb:delete:{job_id}", alice)
    await fake.wait_until(lambda: int(result["id"]) in fake.deleted_messages)


async def test_cancel_buttons_and_commands_before_and_after_a_restart(
    fake: FakeDiscord, make_bot: Callable[..., Any], gate: Gate
) -> None:
    rooms = [fake.add_channel(f"room{n}") for n in range(3)]  # quiet channels: each job has its status
    bot = await make_bot()
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    gate.close()
    a_it, a_status = await draw(fake, alice, prompt="alice running", steps=1, channel=rooms[0])
    assert await gate.wait_entered() == "alice running"
    b_it, b_status = await draw(fake, bob, prompt="bob waiting", steps=1, channel=rooms[1])
    _, c_status = await draw(fake, bob, prompt="bob second", steps=1, channel=rooms[2])
    a_id, b_id, c_id = (job_id_of(m["content"]) for m in (a_status, b_status, c_status))

    queue = await fake.slash("queue", alice)
    assert "2 job(s) waiting from 1 user(s)" in await ephemeral_answer(fake, queue)
    jobs = await fake.slash("jobs", bob)
    assert "bob waiting" in await ephemeral_answer(fake, jobs)
    # deferred privately before the database is read; the listing replaces the "thinking…"
    # message, with a cancel button per unfinished job, newest first
    assert jobs.callback_type == DEFERRED_CHANNEL_MESSAGE and jobs.callback_data.get("flags", 0) & EPHEMERAL
    listing = fake.messages[jobs.original_message_id or 0]
    assert fake.custom_ids(listing) == [f"bb:cancel:{c_id}", f"bb:cancel:{b_id}"]

    nosy = await fake.click(b_status, f"bb:cancel:{b_id}", alice)
    assert "only cancel your own" in await ephemeral_answer(fake, nosy)
    click = await fake.click(b_status, f"bb:cancel:{b_id}", bob)
    assert f"Cancelled job {b_id}. 1 credit(s) refunded." in await ephemeral_answer(fake, click)
    await fake.wait_until(lambda: "was cancelled" in content(fake, b_it.original_message_id))
    assert await bot.job_state(b_id) is JobState.CANCELLED

    await bot.restart()  # alice's running job and bob's second come back, re-queued
    await fake.wait_until(lambda: "Queued job" in content(fake, a_it.original_message_id))
    click = await fake.click(c_status, f"bb:cancel:{c_id}", bob)
    assert f"Cancelled job {c_id}" in await ephemeral_answer(fake, click)
    click = await fake.click(a_status, f"bb:cancel:{a_id}", alice)
    assert f"Stopping job {a_id}" in await ephemeral_answer(fake, click)
    gate.allow()
    await bot.wait_state(a_id, JobState.CANCELLED)
    await fake.wait_until(lambda: "was cancelled" in content(fake, a_it.original_message_id))
    assert await bot.job_state(c_id) is JobState.CANCELLED
    assert bot.store is not None
    for user, job in ((alice, a_id), (bob, b_id), (bob, c_id)):
        kinds = [
            e.kind
            for e in await bot.store.history(UserRef(platform="discord", id=str(user.id)))
            if e.job_id == job
        ]
        assert kinds == [LedgerKind.REFUND, LedgerKind.RESERVE]  # history() is newest first

    cmd = await fake.slash("cancel", bob, job=c_id)
    assert "already finished" in await ephemeral_answer(fake, cmd)


async def test_admin_commands_are_refused_to_members_and_work_for_admins(
    fake: FakeDiscord, make_bot: Callable[..., Any]
) -> None:
    bot = await make_bot(discord_guild_id=fake.guild_id)
    assert not fake.commands.get(None)  # synced to the guild only, for fast iteration
    assert {c["name"] for c in fake.commands[fake.guild_id]} >= {"draw", "brush"}
    member, target = fake.add_user("member"), fake.add_user("target")
    target_ref = UserRef(platform="discord", id=str(target.id))
    calls: list[tuple[str, dict[str, Any]]] = [
        ("brush quota show", {"user": target}),
        ("brush quota set", {"user": target, "credits": 5}),
        ("brush quota grant", {"user": target, "credits": 3}),
        ("brush quota reset", {"user": target}),
        ("brush ban", {"user": target}),
        ("brush unban", {"user": target}),
        ("brush weight", {"user": target, "weight": 2.5}),
        ("brush stats", {}),
    ]
    assert bot.store is not None
    for command, options in calls:
        it = await fake.slash(command, member, **options)
        assert await ephemeral_answer(fake, it) == "Only bot admins can do that", command
    assert await bot.store.history(target_ref) == []

    answers = {}
    for command, options in calls:
        it = await fake.slash(command, fake.owner, **options)
        answers[command] = await ephemeral_answer(fake, it)
    assert f"Target (discord:{target.id})" in answers["brush quota show"]
    assert "5 credit(s) available" in answers["brush quota set"]
    assert "8 credit(s) available" in answers["brush quota grant"]
    assert "is banned" in answers["brush ban"] and "may draw again" in answers["brush unban"]
    assert "weight 2.5" in answers["brush weight"]
    assert "queued: 0" in answers["brush stats"]
    kinds = {e.kind for e in await bot.store.history(target_ref)}
    assert kinds >= {LedgerKind.SET, LedgerKind.GRANT, LedgerKind.RESET, LedgerKind.BAN, LedgerKind.UNBAN}

    await fake.slash("brush ban", fake.owner, user=target)
    refused = await fake.slash("draw", target, prompt="anything")
    assert "banned" in await ephemeral_answer(fake, refused)
    assert refused.original_message_id not in fake.messages  # the public "thinking" message is gone
    assert await bot.store.user_jobs(target_ref) == []


async def test_a_configured_server_permission_makes_admins(
    fake: FakeDiscord, make_bot: Callable[..., Any]
) -> None:
    manager = fake.add_user("manager", permissions=MEMBER_PERMISSIONS | MANAGE_GUILD)
    target = fake.add_user("target2")
    bot = await make_bot(discord_admin_permission=None)
    it = await fake.slash("brush quota grant", manager, user=target, credits=2)
    assert await ephemeral_answer(fake, it) == "Only bot admins can do that"  # ADMIN_IDS only by default
    await bot.stop()

    with pytest.raises(ConfigError, match="needs DISCORD_GUILD_ID"):  # only in the operator's own server
        await make_bot(discord_admin_permission="manage_guild")
    bot = await make_bot(discord_admin_permission="manage_guild", discord_guild_id=fake.guild_id)
    it = await fake.slash("brush quota grant", manager, user=target, credits=2)
    assert "credit(s) available" in await ephemeral_answer(fake, it)
    it = await fake.slash("brush stats", fake.add_user("plain"))
    assert await ephemeral_answer(fake, it) == "Only bot admins can do that"
    grants = await bot.store.history(UserRef(platform="discord", id=str(target.id)))
    assert [e.actor for e in grants] == [f"discord:{manager.id}"]


async def test_no_credits_left_is_a_clear_message_and_no_job(
    fake: FakeDiscord, make_bot: Callable[..., Any]
) -> None:
    bot = await make_bot(daily_credits=1)
    alice = fake.add_user("alice")
    alice_ref = UserRef(platform="discord", id=str(alice.id))
    it, status = await draw(fake, alice, prompt="the only one", steps=1)
    assert "0 left" in status["content"]
    await result_of(fake, it.original_message_id)

    again = await fake.slash("draw", alice, prompt="one more", steps=1)
    text = await ephemeral_answer(fake, again)
    assert "Not enough credits" in text and "Credits refill at" in text
    assert again.original_message_id not in fake.messages
    assert bot.store is not None and len(await bot.store.user_jobs(alice_ref)) == 1

    credits = await fake.slash("credits", alice)
    assert "You have 0 credit(s) left" in await ephemeral_answer(fake, credits)
    helped = await fake.slash("help", alice)
    assert "/draw" in await ephemeral_answer(fake, helped)


async def test_a_late_result_goes_to_the_channel_and_a_gone_channel_refunds(
    fake: FakeDiscord, make_bot: Callable[..., Any], gate: Gate
) -> None:
    doomed = fake.add_channel("doomed")
    bot = await make_bot()
    alice = fake.add_user("alice")
    alice_ref = UserRef(platform="discord", id=str(alice.id))
    gate.close()
    it, status = await draw(fake, alice, prompt="a slow one", steps=1)
    job_id = job_id_of(status["content"])
    await gate.wait_entered()
    fake.expire(it.token)  # the 15 minutes are over: follow-ups and edits get 401
    gate.allow(1)

    def posted() -> dict[str, Any] | None:
        return next(
            (m for m in fake.channel_messages(fake.general.id) if m["attachments"] and "webhook_id" not in m),
            None,
        )

    late = await fake.wait_until(posted)
    assert late["content"].startswith(alice.mention) and [u["id"] for u in late["mentions"]] == [
        str(alice.id)
    ]
    job = await bot.svc.job(job_id)
    await bot.wait_state(job_id, JobState.DELIVERED)
    job = await bot.svc.job(job_id)
    assert fake.files_of(late)[0][1] == Path(job.outputs[0]).read_bytes()
    assert fake.custom_ids(late) == [f"bb:{a}:{job_id}" for a in RESULT_ACTIONS]
    await fake.wait_until(lambda: "is done" in content(fake, it.original_message_id))

    # with a short token lifetime the adapter goes to the channel without trying the token first
    bot.token_lifetime = 0.0
    await bot.restart()
    before = len(fake.requests)
    _, lost_status = await draw(fake, alice, prompt="nobody will see this", steps=1, channel=doomed)
    assert not [r for r in fake.requests[before:] if r.path.startswith("/webhooks/")]
    lost_id = job_id_of(lost_status["content"])
    await gate.wait_entered()
    doomed.deleted = True
    gate.allow()
    await bot.wait_state(lost_id, JobState.FAILED)
    assert bot.store is not None
    failed = await bot.store.get_job(lost_id)
    assert failed is not None and "could not be reached" in (failed.error or "")
    kinds = [e.kind for e in await bot.store.history(alice_ref) if e.job_id == lost_id]
    assert LedgerKind.REFUND in kinds and LedgerKind.COMMIT not in kinds


async def test_an_oversized_result_falls_back_to_a_smaller_encoding(
    fake: FakeDiscord, make_bot: Callable[..., Any]
) -> None:
    fake.attachment_size_limit = 5000  # interactions report it; the fake refuses bigger uploads with 413
    bot = await make_bot()
    alice = fake.add_user("alice")
    it, status = await draw(fake, alice, prompt="too detailed", steps=1)
    result = await result_of(fake, it.original_message_id)
    job = await bot.svc.job(job_id_of(status["content"]))
    [(filename, data)] = fake.files_of(result)
    assert Path(job.outputs[0]).stat().st_size > 5000  # the PNG itself would not fit
    assert filename.endswith((".jpg", ".webp")) and len(data) <= 5000
    assert "to fit the upload limit" in result["content"]


async def test_rate_limits_and_a_refused_upload_are_survived(
    fake: FakeDiscord, make_bot: Callable[..., Any]
) -> None:
    fake.rate_limit("PUT", r"/applications/\d+/commands")  # at start-up, through discord.py's HTTP client
    bot = await make_bot()
    alice = fake.add_user("alice")
    fake.rate_limit("POST", r"/interactions/\d+/[^/]+/callback")  # the defer itself
    fake.rate_limit("PATCH", WEBHOOK_EDIT, times=2)
    fake.fail(
        "PATCH", WEBHOOK_EDIT, status=413, body={"code": 40005, "message": "Request entity too large"},
        where=lambda r: bool(r.files),  # the upload of the result
    )  # fmt: skip
    it, status = await draw(fake, alice, prompt="under pressure", steps=1)
    result = await result_of(fake, it.original_message_id)
    await bot.wait_state(job_id_of(status["content"]), JobState.DELIVERED)
    assert len([r for r in fake.requests if r.injected and r.status == 429]) == 4
    assert [r for r in fake.requests if r.injected and r.status == 413]
    assert fake.files_of(result)


async def test_a_result_discord_refuses_ends_refunded_and_the_requester_is_told(
    fake: FakeDiscord, make_bot: Callable[..., Any]
) -> None:
    bot = await make_bot()
    alice = fake.add_user("alice")
    alice_ref = UserRef(platform="discord", id=str(alice.id))
    before = (await bot.svc.credits(alice_ref)).available
    fake.fail(
        "PATCH", WEBHOOK_EDIT, status=400, body={"code": 50035, "message": "Invalid Form Body"},
        times=10, where=lambda r: bool(r.files),
    )  # fmt: skip
    it, status = await draw(fake, alice, prompt="refused", steps=1)
    job_id = job_id_of(status["content"])
    await bot.wait_state(job_id, JobState.FAILED)
    # one try: a bad request is not repeated
    assert len([r for r in fake.requests if r.injected and r.status == 400]) == 1
    told = await fake.wait_until(lambda: "could not be posted" in content(fake, it.original_message_id))
    assert told is not None and not fake.files_of(fake.messages[it.original_message_id])
    kinds = [e.kind for e in await bot.store.history(alice_ref) if e.job_id == job_id]
    assert LedgerKind.REFUND in kinds and LedgerKind.COMMIT not in kinds
    assert (await bot.svc.credits(alice_ref)).available == before


async def test_blocked_and_nsfw_words_and_spoilers(fake: FakeDiscord, make_bot: Callable[..., Any]) -> None:
    after_dark = fake.add_channel("after-dark", nsfw=True)
    bot = await make_bot(blocked_words=["forbidden"], nsfw_words=["nude"], discord_spoiler=True)
    alice = fake.add_user("alice")
    alice_ref = UserRef(platform="discord", id=str(alice.id))

    for channel in (fake.general, after_dark):
        it = await fake.slash("draw", alice, prompt="a forbidden thing", channel=channel)
        assert "blocked word" in await ephemeral_answer(fake, it)
    it = await fake.slash("draw", alice, prompt="a nude statue")
    assert "only allowed in channels marked NSFW" in await ephemeral_answer(fake, it)
    # malformed requests are refused at once, privately, without deferring
    it = await fake.slash("draw", alice, prompt="a fox --steps 999")
    assert "--steps 999 is out of range" in await ephemeral_answer(fake, it)
    assert it.callback_type == CHANNEL_MESSAGE
    it = await fake.slash("draw", alice, prompt="a fox --seed 1", seed=2)
    assert "given twice" in await ephemeral_answer(fake, it)
    assert bot.store is not None and await bot.store.user_jobs(alice_ref) == []

    ok, status = await draw(
        fake, alice, prompt="a nude statue --seed 5", steps=1, count=2, channel=after_dark
    )
    result = await result_of(fake, ok.original_message_id)
    job = await bot.svc.job(job_id_of(status["content"]))
    files = fake.files_of(result)
    assert [name for name, _ in files] == ["SPOILER_" + Path(p).name for p in job.outputs]
    assert [data for _, data in files] == [Path(p).read_bytes() for p in job.outputs]
    assert job.seeds == (5, 6) and "seed 5, 6" in result["content"]


def test_tokens_are_redacted_in_messages_and_tracebacks() -> None:
    interaction_token = register_secret("aW50ZXJhY3Rpb246MTIzNDU2Nzg5OnNlY3JldA.x_y-z", "interaction token")
    url = f"https://discord.com/api/v10/webhooks/1234567890/{interaction_token}/messages/@original"
    payload = {"id": "1", "token": interaction_token}
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    # the filter the adapter installs: on the root handlers and on discord.py's (and our) loggers
    undo = guard_logs([TOKEN], (URL_TOKEN, FIELD_TOKEN), REDACTED_LOGGERS)
    late = io.StringIO()  # a handler added afterwards on a guarded logger is covered too
    late_handler = logging.StreamHandler(late)
    own = logging.getLogger("discord.webhook.async_")
    own.addHandler(late_handler)
    try:
        for name in ("discord.webhook.async_", "somewhere.else"):
            logger = logging.getLogger(name)
            try:
                raise RuntimeError(f"PATCH {url} failed with bot token {TOKEN}")
            except RuntimeError:
                logger.error("could not edit %s (payload %s)", url, payload, exc_info=True)
    finally:
        undo()
        own.removeHandler(late_handler)
        root.removeHandler(handler)
    text = out.getvalue()
    assert "Traceback" in text and "RuntimeError: PATCH" in text and "somewhere.else" in text
    assert "Traceback" in late.getvalue()
    for logged in (text, late.getvalue()):
        assert interaction_token not in logged and TOKEN not in logged
        assert "/webhooks/1234567890/[redacted]/messages" in logged and "'token': '[redacted]'" in logged
    assert not handler.filters and not own.filters  # undone


# ---------------------------------------------------------------------- busy channels


async def until(predicate: Callable[[], bool]) -> None:
    """Poll a condition of the service (the fake's own waits only wake on its requests)."""
    for _ in range(2000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


def answered_to(fake: FakeDiscord, it: FakeInteraction) -> list[Any]:
    """Requests after the acknowledgement that wrote to this interaction's messages (its webhook)."""
    return [
        r for r in fake.requests
        if r.method in ("POST", "PATCH") and r.path.startswith("/webhooks/") and it.token in r.path
        and 200 <= r.status < 300
    ]  # fmt: skip


def messages_in(fake: FakeDiscord, channel_id: int, since: int = 0) -> list[Any]:
    """What the channel saw of the bot beyond the acknowledgements every interaction must get."""
    return [r for r in fake.writes(channel_id)[since:] if not r.path.startswith("/interactions/")]


async def test_a_quiet_channel_still_shows_status_and_progress(
    fake: FakeDiscord, make_bot: Callable[..., Any]
) -> None:
    bot = await make_bot()
    alice = fake.add_user("alice")
    it, status = await draw(fake, alice, prompt="a quiet pond", steps=8)
    job_id = job_id_of(status["content"])
    await result_of(fake, it.original_message_id)
    await bot.wait_state(job_id, JobState.DELIVERED)
    texts = [str((r.json or {}).get("content", "")) for r in answered_to(fake, it)]
    assert texts[0].startswith(f"Queued job {job_id}")
    assert any(t.startswith(f"Drawing job {job_id}") for t in texts), (
        "a quiet channel sees its job's progress"
    )
    assert texts[-1].startswith("a quiet pond")  # the result took the status message's place


async def test_a_busy_channel_costs_about_one_message_per_image_and_each_result_replaces_its_ack(
    fake: FakeDiscord, make_bot: Callable[..., Any], gate: Gate
) -> None:
    bot = await make_bot()
    people = [fake.add_user(f"user{n}") for n in range(6)]
    gate.close()
    since = len(fake.writes(fake.general.id))
    first, status = await draw(fake, people[0], prompt="picture 0 --seed 0", steps=8)
    await gate.wait_entered()
    others = [await fake.slash("draw", user, prompt=f"picture {n} --seed {n}", steps=8)
              for n, user in enumerate(people[1:], start=1)]  # fmt: skip
    for it in others:
        await fake.wait_response(it)
        assert it.callback_type == DEFERRED_CHANNEL_MESSAGE  # the deferral is the acknowledgement
    await until(lambda: len(bot.svc.queue_view().entries) == 6)
    assert all(not answered_to(fake, it) for it in others)  # no tickets while the channel is busy
    gate.allow()
    results = [await result_of(fake, it.original_message_id) for it in [first, *others]]
    for n, result in enumerate(results):
        assert result["content"].startswith(f"picture {n}") and f"seed {n}" in result["content"]
        await bot.wait_state(job_of(result), JobState.DELIVERED)
    for it in others:
        assert len(answered_to(fake, it)) == 1  # its result, nothing else
    # the first job found the channel quiet (its ticket, maybe a progress edit); the others cost one each
    assert len(messages_in(fake, fake.general.id, since)) <= 6 + 1 + 2
    assert job_of(results[0]) == job_id_of(status["content"])


async def test_a_refusal_in_a_busy_channel_still_gets_its_line(
    fake: FakeDiscord, make_bot: Callable[..., Any], gate: Gate
) -> None:
    bot = await make_bot()
    gate.close()
    for n in range(4):
        await fake.wait_response(
            await fake.slash("draw", fake.add_user(f"user{n}"), prompt=f"busy {n}", steps=1)
        )
    await until(lambda: len(bot.svc.queue_view().entries) == 4)
    refused = await fake.slash("draw", fake.add_user("eve"), prompt="too long --steps 9999")
    line = await ephemeral_answer(fake, refused)
    assert "9999" in line and "\n" not in line and refused.callback_type == CHANNEL_MESSAGE
    gate.allow()
    await until(lambda: not bot.svc.queue_view().entries)


async def test_results_are_not_delayed_by_progress_in_a_tight_bucket(
    tiny_settings: Settings, worker: Worker
) -> None:
    # an interaction's webhook takes 3 calls in 10 s here: the ticket, at most one progress edit,
    # and the result must never wait for the window because progress used it up
    buckets = {WEBHOOK_ROUTE: Bucket(name="webhook", limit=3, per=10.0)}
    async with FakeDiscord(token=TOKEN, buckets=buckets) as fake:
        bot = bot_on(fake, tiny_settings, worker, progress_interval=0.01, group_progress_interval=0.01)
        await bot.start()
        try:
            it, status = await draw(fake, fake.add_user("alice"), prompt="a tight bucket", steps=8)
            await result_of(fake, it.original_message_id)
            await bot.wait_state(job_id_of(status["content"]), JobState.DELIVERED)
            calls = answered_to(fake, it)
            assert len(calls) <= 3 and calls[-1].files  # the result went in the bucket's first window
            assert calls[-1].at - calls[0].at < 10.0
            assert not fake.rate_limited, [f"{r.method} {r.path}" for r in fake.rate_limited]
        finally:
            await bot.stop()


async def test_a_429_that_arrives_anyway_is_honoured_and_nothing_is_lost(
    fake: FakeDiscord, make_bot: Callable[..., Any], gate: Gate
) -> None:
    bot = await make_bot()
    people = [fake.add_user(f"user{n}") for n in range(5)]
    gate.close()
    fake.rate_limit("PATCH", WEBHOOK_EDIT, retry_after=0.3, times=3)  # Discord disagrees with the headers
    its = [await fake.slash("draw", user, prompt=f"limited {n}", steps=1) for n, user in enumerate(people)]
    for it in its:
        await fake.wait_response(it)
    gate.allow()
    results = [await result_of(fake, it.original_message_id) for it in its]
    assert len([r for r in fake.requests if r.injected and r.status == 429]) == 3
    assert bot.store is not None
    for user, result in zip(people, results, strict=True):
        [job] = await bot.store.user_jobs(UserRef(platform="discord", id=str(user.id)))
        assert job.state is JobState.DELIVERED and job.id == job_of(result)
    uploads = [r for r in fake.requests if r.files and 200 <= r.status < 300]
    assert len(uploads) == 5  # each delivered once


async def test_cancel_without_an_id_cancels_the_newest_job(
    fake: FakeDiscord, make_bot: Callable[..., Any], gate: Gate
) -> None:
    bot = await make_bot()
    alice = fake.add_user("alice")
    gate.close()
    _, status = await draw(fake, alice, prompt="older", steps=1)
    await gate.wait_entered()
    newer = await fake.slash("draw", alice, prompt="newer", steps=1)
    await fake.wait_response(newer)
    await until(lambda: len(bot.svc.queue_view().entries) == 2)
    assert bot.store is not None
    newest, older = await bot.store.user_jobs(UserRef(platform="discord", id=str(alice.id)))
    assert older.id == job_id_of(status["content"]) and newest.request.prompt == "newer"
    cmd = await fake.slash("cancel", alice)
    assert await ephemeral_answer(fake, cmd) == f"Cancelled job {newest.id}. 1 credit(s) refunded."
    await fake.wait_until(lambda: "was cancelled" in content(fake, newer.original_message_id))
    assert (
        await bot.job_state(older.id) is JobState.QUEUED or await bot.job_state(older.id) is JobState.RUNNING
    )
    gate.allow()
    await bot.wait_state(older.id, JobState.DELIVERED)
    cmd = await fake.slash("cancel", alice)
    assert await ephemeral_answer(fake, cmd) == messages.sentence(messages.NOTHING_TO_CANCEL)


async def test_the_same_sentence_reads_the_same_on_discord_and_the_console(
    fake: FakeDiscord, make_bot: Callable[..., Any]
) -> None:
    from adapters.console import ConsoleAdapter

    bot = await make_bot()
    out = io.StringIO()
    console = ConsoleAdapter(
        bot.svc, stdin=io.StringIO(""), stdout=out, user=UserRef(platform="console", id="me")
    )
    alice = fake.add_user("alice")
    shown_on_discord = [
        await ephemeral_answer(fake, await fake.slash("draw", alice, prompt="a fox --steps 9999")),
        await ephemeral_answer(fake, await fake.slash("cancel", alice)),
        await ephemeral_answer(fake, await fake.slash("credits", alice)),
    ]
    for line in ["/draw a fox --steps 9999", "/cancel", "/credits"]:
        try:
            await console.handle(line)
        except Exception as err:  # the console's loop turns core errors into their line
            console.say("⚠ " + messages.error_text(err, bot.svc.next_refill_text()))
    shown = [line.removeprefix("⚠ ") for line in out.getvalue().splitlines()]
    assert shown_on_discord[:2] == shown[:2]  # the refusal and "nothing to cancel", word for word
    assert shown_on_discord[2].split(":")[0] == shown[2].split(":")[0]  # "You have 10 credit(s) left"


# ---------------------------------------------------------------------- drawing from a picture


@pytest.fixture
async def picture_bot(fake: FakeDiscord, tiny_settings: Settings, tiny_worker: Worker) -> AsyncIterator[Bot]:
    """The stack on a plain worker: image-to-image needs the real pipeline (the gate's wrapper is not one)."""
    bot = bot_on(fake, tiny_settings, tiny_worker, max_input_bytes=64 * 1024)
    await bot.start()
    try:
        yield bot
    finally:
        await bot.stop()


def png(width: int = 96, height: int = 64, colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


def gif() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(out, format="GIF")
    return out.getvalue()


async def test_draw_with_an_image_option_draws_from_it_and_records_the_strength(
    fake: FakeDiscord, picture_bot: Bot, tmp_path: Path
) -> None:
    bot = picture_bot
    alice = fake.add_user("alice")
    commands = {c["name"]: c for c in fake.commands[None]}
    options = {o["name"]: o for o in commands["draw"]["options"]}
    assert options["image"]["type"] == 11 and options["strength"]["max_value"] == 1.0
    it, status = await draw(fake, alice, prompt="a watercolour", steps=4, image=fake.upload("in.png", png()),
                            strength=0.5)  # fmt: skip
    job_id = job_id_of(status["content"])
    result = await result_of(fake, it.original_message_id)
    await bot.wait_state(job_id, JobState.DELIVERED)
    job = await bot.svc.job(job_id)
    assert job.request.strength == 0.5 and job.request.source
    assert "strength 0.5" in result["content"]
    [(filename, data)] = fake.files_of(result)
    (tmp_path / filename).write_bytes(data)
    meta = read_parameters(tmp_path / filename)
    assert meta["denoising_strength"] == "0.5" and meta["source_hash"] == job.request.source[:10]


async def test_pictures_are_refused_in_one_line_with_no_credit_spent(
    fake: FakeDiscord, picture_bot: Bot
) -> None:
    bot = picture_bot  # MAX_INPUT_BYTES 64 KiB
    alice = fake.add_user("alice")
    alice_ref = UserRef(platform="discord", id=str(alice.id))
    noise = bytes(range(256)) * 320  # 80 kB: over the limit by its declared size
    cases = [
        (fake.upload("big.png", b"\x89PNG\r\n\x1a\n" + noise), "the limit is"),
        (fake.upload("bomb.png", png_header_only(20000, 20000)), "over 179 megapixels"),
        (fake.upload("anim.gif", gif(), "image/gif"), "GIF"),
        (fake.upload("notes.png", b"just some text, not a picture at all"), "PNG, JPEG or WebP"),
    ]
    before = len(fake.requests)
    for upload, reason in cases:
        it = await fake.slash("draw", alice, prompt="from this", image=upload)
        line = await ephemeral_answer(fake, it)
        assert reason in line and "\n" not in line, line
        left = fake.messages.get(it.original_message_id or 0)
        assert left is None or left["flags"] & EPHEMERAL  # no public "thinking…" left behind
    downloads = [r for r in fake.requests[before:] if "/attachments/" in r.path]
    assert not downloads  # the REST log never sees CDN downloads; the big one was refused before it
    assert bot.store is not None and await bot.store.user_jobs(alice_ref) == []
    credits = await fake.slash("credits", alice)
    assert f"You have {bot.settings.daily_credits} credit(s) left" in await ephemeral_answer(fake, credits)


async def test_vary_this_image_on_a_members_picture_and_on_our_result(
    fake: FakeDiscord, picture_bot: Bot
) -> None:
    bot = picture_bot
    alice, bob = fake.add_user("alice"), fake.add_user("bob")
    posted = fake.post_as(bob, fake.general, "a castle on a hill", [("castle.png", png(80, 48))])
    it = await fake.message_command("Vary this image", alice, posted)
    await fake.wait_response(it)
    assert it.callback_type == DEFERRED_CHANNEL_MESSAGE
    result = await result_of(fake, it.original_message_id)
    job = await bot.svc.job(job_of(result))
    assert job.request.prompt == "a castle on a hill" and job.request.source and job.user.id == str(alice.id)
    await bot.wait_state(job.id, JobState.DELIVERED)

    again = await fake.message_command("Vary this image", bob, fake.messages[int(result["id"])])
    varied = await result_of(fake, (await fake.wait_response(again)).original_message_id)
    second = await bot.svc.job(job_of(varied))
    assert second.request.prompt == "a castle on a hill" and second.request.strength == VARY_SUBTLE
    assert second.id != job.id and second.request.source != job.request.source

    bare = fake.post_as(bob, fake.general, "no picture here")
    refused = await fake.message_command("Vary this image", alice, bare)
    assert await ephemeral_answer(fake, refused) == messages.sentence(messages.NO_PICTURE_IN_MESSAGE)


async def test_vary_buttons_work_after_a_restart(fake: FakeDiscord, picture_bot: Bot) -> None:
    bot = picture_bot
    alice = fake.add_user("alice")
    it, status = await draw(fake, alice, prompt="a lantern --seed 3", steps=4)
    job_id = job_id_of(status["content"])
    result = await result_of(fake, it.original_message_id)
    await bot.wait_state(job_id, JobState.DELIVERED)
    await bot.restart()
    for action, strength in (("subtle", VARY_SUBTLE), ("strong", VARY_STRONG)):
        click = await fake.click(result, f"bb:{action}:{job_id}", alice)
        await fake.wait_response(click)
        assert click.callback_type == DEFERRED_CHANNEL_MESSAGE
        varied = await result_of(fake, click.original_message_id)
        job = await bot.svc.job(job_of(varied))
        assert job.request.prompt == "a lantern" and job.request.strength == strength
        assert job.seeds != (3,) and f"strength {strength:g}" in varied["content"]
        await bot.wait_state(job.id, JobState.DELIVERED)


async def test_user_text_cannot_format_link_unfurl_or_mention(
    fake: FakeDiscord, make_bot: Callable[..., Any]
) -> None:
    bot = await make_bot()
    alice = fake.add_user("alice")
    hostile = "[free nitro](https://evil.example/claim) **boss** __u__ ||x|| `c` @everyone <@1> <#2>"
    it, status = await draw(fake, alice, prompt=f"{hostile} --seed 3")
    result = await result_of(fake, it.original_message_id)
    await bot.wait_state(job_id_of(status["content"]), JobState.DELIVERED)
    for raw in (status["content"], result["content"]):
        # no masked link, no bold/underline/spoiler/code, no mention: every marker is escaped
        assert not re.search(r"(?<!\\)\[[^\]]*(?<!\\)\]\(", raw), raw
        assert not re.search(r"(?<!\\)(\*\*|__|\|\||`)", raw), raw
        assert "@everyone" not in raw and not re.search(r"(?<!\\)<[@#]", raw), raw
    assert "<https://evil.example/claim>" in result["content"]  # clickable, but Discord shows no preview
    # and people read exactly what was typed
    assert rendered(result["content"]).replace("<https://evil.example/claim>", "https://evil.example/claim") \
        .replace("@\u200beveryone", "@everyone").startswith(hostile)  # fmt: skip
    assert result.get("mentions", []) == [] and not result.get("mention_everyone")


class SlowStore:
    """The bot's store with every database call ``delay`` seconds slower (a busy disk, a big file)."""

    def __init__(self, inner: Any, delay: float) -> None:
        self._inner, self._delay = inner, delay

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def slowed(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(self._delay)
            return await attr(*args, **kwargs)

        return slowed


async def test_every_command_is_acknowledged_before_a_slow_database_answers(
    fake: FakeDiscord, make_bot: Callable[..., Any]
) -> None:
    bot = await make_bot()
    alice, target = fake.add_user("alice"), fake.add_user("target")
    await ephemeral_answer(fake, await fake.slash("credits", alice))  # known to the store
    fake.ack_deadline = 0.5
    bot.svc.store = SlowStore(bot.svc.store, 1.0)  # every read and write takes twice the deadline
    calls: list[tuple[str, FakeUser, dict[str, Any]]] = [
        ("credits", alice, {}),
        ("jobs", alice, {}),
        ("queue", alice, {}),
        ("cancel", alice, {}),
        ("help", alice, {}),
        ("brush quota show", fake.owner, {"user": target}),
        ("brush quota grant", fake.owner, {"user": target, "credits": 2}),
        ("brush stats", fake.owner, {}),
        ("draw", alice, {"prompt": "a slow fox"}),
    ]
    for command, user, options in calls:
        it = await fake.slash(command, user, **options)
        answer = await ephemeral_answer(fake, it) if command != "draw" else None
        await fake.wait_response(it)
        # the acknowledgement came within the deadline, before the store could answer anything
        assert it.callback_status == 200 and it.callback_type == DEFERRED_CHANNEL_MESSAGE, (
            command,
            it.callback,
        )
        assert answer is None or answer.strip(), command
    assert fake.errors == []

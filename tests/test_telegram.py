"""The Telegram adapter end to end: real python-telegram-bot, service, SQLite and tiny model against a fake Bot API."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import itertools
import logging
import re
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import SecretStr

from adapters.telegram import TelegramAdapter, Webhook, parse_callback
from bot import messages
from bot.config import Settings
from bot.domain import VARY_STRONG, VARY_SUBTLE, DrawRequest, Job, JobState, UserRef
from bot.errors import ConfigError
from bot.ports import Rendered, StepCallback
from bot.service import Service
from data import SqliteStore
from generation.images import ImageStore, read_parameters
from generation.sources import SourceStore
from tests.fakes.telegram_server import DEFAULT_TOKEN, ApiCall, FakeTelegram, Limit, StoredMessage
from tests.leaks import register_secret
from tests.support import png_header_only
from tests.test_pictures import encode, gradient

ALICE = FakeTelegram.user(11, "Alice", "alice")
BOB = FakeTelegram.user(12, "Bob", "bob")
ADA = FakeTelegram.user(900, "Ada", "ada")  # the admin
GROUP = -100_111
#: Telegram's group limit, on a shorter window so a test that talks a lot in one group stays quick
TEST_GROUP_LIMIT = Limit(calls=20, window=2.0)


def ref(user: dict[str, Any]) -> UserRef:
    return UserRef(platform="telegram", id=str(user["id"]))


class GatedWorker:
    """The real tiny worker behind a gate the test opens: holds jobs so the queue can be looked at."""

    def __init__(self, worker: Any) -> None:
        self.name = worker.name
        self.profile = worker.profile
        self._worker = worker
        self.gate = asyncio.Event()
        self.gate.set()
        self.prompts: list[str] = []

    async def generate(
        self, request: DrawRequest, seeds: tuple[int, ...], *, on_step: StepCallback, cancel: threading.Event
    ) -> Rendered:
        self.prompts.append(request.prompt)
        await self.gate.wait()
        rendered: Rendered = await self._worker.generate(request, seeds, on_step=on_step, cancel=cancel)
        return rendered


class Harness:
    """Service + store + adapter on one database, against one fake; ``restart`` rebuilds all but the DB."""

    def __init__(self, tg: FakeTelegram, settings: Settings, gen: GatedWorker, **adapter_kw: Any) -> None:
        self.tg = tg
        self.settings = settings
        self.gen = gen
        self.adapter_kw: dict[str, Any] = {
            "poll_timeout": 5.0,
            "private_window": 0.02,
            "group_limit": TEST_GROUP_LIMIT.calls,
            "group_window": TEST_GROUP_LIMIT.window,
            **adapter_kw,
        }

    async def open(self) -> None:
        self.store = SqliteStore(self.settings.db_path)
        await self.store.start()
        self.service = Service(
            settings=self.settings,
            store=self.store,
            workers=[self.gen],
            sink=ImageStore(self.settings.output_dir, self.gen.profile.name),
            sources=SourceStore(self.settings.output_dir),
            delivery_backoff=(0.01, 0.01),
        )
        await self.service.start()
        self.adapter = TelegramAdapter(self.service, self.settings, **self.adapter_kw)
        await self.adapter.start()
        await self.service.recover()

    async def close(self) -> None:
        await self.adapter.close()
        await self.service.close()
        await self.store.close()

    async def restart(self) -> None:
        await self.close()
        await self.open()

    async def handled(self) -> None:
        """Every injected update was fetched and fully handled (error hook included), answers sent."""
        await self.tg.wait_confirmed()
        await self.adapter.app.update_queue.join()
        await self.service.status.flushed()

    async def say(
        self, chat: dict[str, Any], user: dict[str, Any], text: str, reply_to: int | None = None
    ) -> dict[str, Any]:
        message = self.tg.inject_message(chat, user, text, reply_to=reply_to)
        await self.handled()
        return message

    async def press(self, user: dict[str, Any], message: StoredMessage, label: str) -> ApiCall:
        """Press a button and return the answer to the callback query."""
        query = self.tg.press(user, message, label)
        await self.handled()
        answer = self.tg.answer(query)
        assert answer is not None, f"callback {label} was not answered"
        return answer

    async def settled(self) -> None:
        async with asyncio.timeout(30):
            await self.service.wait_idle()

    def replies(self, chat_id: int) -> list[str]:
        """Texts of successful plain messages the bot sent to ``chat_id``."""
        return [str(c.params.get("text")) for c in self.tg.calls_of("sendMessage", chat_id, ok=True)]

    async def job(self, message: StoredMessage) -> Job:
        job_id = job_id_of(message)
        job = await self.store.get_job(job_id)
        assert job is not None
        return job


def job_id_of(message: StoredMessage) -> str:
    for button in message.buttons():
        parsed = parse_callback(button.get("callback_data"))
        if parsed is not None:
            return parsed[1]
    raise AssertionError(f"no brushbot button under message {message.message_id}")


def result_message(tg: FakeTelegram, call: ApiCall) -> StoredMessage:
    result = call.result[0] if isinstance(call.result, list) else call.result
    return tg.message(result["chat"]["id"], result["message_id"])


@pytest.fixture(autouse=True)
def _loopback_without_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # httpx honours HTTP(S)_PROXY; the fake lives on 127.0.0.1
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("PTB_TIMEDELTA", "1")  # PTB 22's opt-in; silences its deprecation warning


@pytest.fixture
async def tg() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram(group_limit=TEST_GROUP_LIMIT) as fake:
        yield fake
        # the Bot API answered no edit with unchanged text, ever
        assert not [c for c in fake.calls if "not modified" in (c.description or "")]
        # nothing went over Telegram's flood limits (20 counted calls in any 60 s per group)
        assert not fake.rate_limited, [f"{c.method}:{c.chat_id}" for c in fake.rate_limited]


def make_settings(tiny_settings: Settings, tg: FakeTelegram, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "telegram_token": SecretStr(tg.token),
        "telegram_base_url": tg.base_url,
        "telegram_base_file_url": tg.base_file_url,
        "admin_ids": [f"telegram:{ADA['id']}"],
        "progress_interval": 0.01,
        "group_progress_interval": 0.05,
        "daily_credits": 10,
        **overrides,
    }
    return tiny_settings.model_copy(update=values)


@pytest.fixture
def gen(tiny_worker: Any) -> GatedWorker:
    return GatedWorker(tiny_worker)


@pytest.fixture
async def h(tg: FakeTelegram, tiny_settings: Settings, gen: GatedWorker) -> AsyncIterator[Harness]:
    harness = Harness(tg, make_settings(tiny_settings, tg), gen)
    await harness.open()
    yield harness
    await harness.close()


# ---------------------------------------------------------------------------------- drawing


async def test_group_draw_gets_a_jpeg_photo_of_the_saved_png_with_its_seed(
    h: Harness, tg: FakeTelegram
) -> None:
    group = tg.group(GROUP, "artists")
    command = await h.say(group, ALICE, "/draw a red fox in snow --seed 42")
    [status_call] = tg.calls_of("sendMessage", GROUP)
    status = result_message(tg, status_call)
    assert "Queued job" in str(status_call.params["text"])
    assert "cost 1 credit(s), 9 left" in str(status_call.params["text"])
    assert status_call.params["reply_parameters"]["message_id"] == command["message_id"]
    assert [b["text"] for b in status.buttons()] == ["✖ Cancel"]

    photo_call = await tg.wait_for("sendPhoto")
    await h.settled()
    photo = result_message(tg, photo_call)
    job = await h.job(photo)
    assert job.state is JobState.DELIVERED
    # the photo is the JPEG preview made with the PNG (Telegram recompresses photos anyway)
    [upload] = photo_call.uploads
    assert (
        upload.data[:3] == b"\xff\xd8\xff"
        and upload.filename == Path(job.outputs[0]).with_suffix(".jpg").name
    )
    with Image.open(io.BytesIO(upload.data)) as img, Image.open(job.outputs[0]) as png:
        assert img.format == "JPEG" and img.size == png.size
    caption = str(photo_call.params["caption"])
    assert caption.startswith("a red fox in snow") and "seed 42" in caption and len(caption) <= 1024
    assert "64x64" in caption and "8 steps" in caption and re.search(r" · \d+\.\ds$", caption)
    assert [b["text"] for b in photo.buttons()] == [
        "🎲 Reroll", "🖼 Original PNG", "🗑 Delete", "🌱 Vary (subtle)", "🌀 Vary (strong)"
    ]  # fmt: skip
    assert all(
        len(b["callback_data"].encode()) <= 64 and job.id in b["callback_data"] for b in photo.buttons()
    )
    # one status message, edited in place, then removed: the photo is the result
    assert tg.message(GROUP, status.message_id).deleted
    assert [m.message_id for m in tg.bot_messages(GROUP)] == [photo.message_id]
    assert all(c.chat_id == GROUP for c in tg.calls_of("editMessageText"))


async def test_commands_for_other_bots_are_ignored_and_ours_are_served(h: Harness, tg: FakeTelegram) -> None:
    group = tg.group(GROUP, "artists")
    await h.say(group, ALICE, "/draw@some_other_bot a cat")
    await h.say(group, ALICE, "/help@some_other_bot")
    assert [c for c in tg.calls if c.chat_id == GROUP] == []
    assert await h.store.user_jobs(ref(ALICE)) == []

    await h.say(group, ALICE, f"/draw@{tg.bot_username} a cat")
    await tg.wait_for("sendPhoto")
    await h.settled()
    [job] = await h.store.user_jobs(ref(ALICE))
    assert job.request.prompt == "a cat" and job.state is JobState.DELIVERED


async def test_draw_as_a_reply_borrows_the_replied_text(h: Harness, tg: FakeTelegram) -> None:
    group = tg.group(GROUP, "artists")
    idea = await h.say(group, BOB, "a lighthouse in a storm")
    await h.say(group, ALICE, "/draw --seed 7", reply_to=idea["message_id"])
    photo_call = await tg.wait_for("sendPhoto")
    assert str(photo_call.params["caption"]).startswith("a lighthouse in a storm")
    assert "seed 7" in str(photo_call.params["caption"])
    await h.settled()
    [job] = await h.store.user_jobs(ref(ALICE))
    assert job.request.prompt == "a lighthouse in a storm" and job.user == ref(ALICE)


async def test_private_progress_edits_and_an_album_for_three_images(h: Harness, tg: FakeTelegram) -> None:
    chat = tg.private_chat(ALICE)
    await h.say(chat, ALICE, "/draw three foxes --n 3 --seed 100")
    album = await tg.wait_for("sendMediaGroup")
    await h.settled()
    media = album.params["media"]
    assert [m["type"] for m in media] == ["photo"] * 3
    assert "seed 100, 101, 102" in media[0]["caption"] and all("caption" not in m for m in media[1:])
    [job] = await h.store.user_jobs(ref(ALICE))
    # the JPEG previews of the saved PNGs, in order
    assert [u.filename for u in album.uploads] == [Path(p).with_suffix(".jpg").name for p in job.outputs]
    assert all(u.data[:3] == b"\xff\xd8\xff" for u in album.uploads)
    # the status message became the album's keyboard; progress edits went to it, text never repeated
    keyboard = [m for m in tg.bot_messages(ALICE["id"]) if m.buttons()]
    assert len(keyboard) == 1 and job_id_of(keyboard[0]) == job.id
    edits = [c for c in tg.calls_of("editMessageText", ALICE["id"]) if "Drawing job" in str(c.params["text"])]
    assert edits, "no progress edit in a private chat with no throttle"
    texts = [str(c.params["text"]) for c in tg.calls_of("editMessageText", ALICE["id"])]
    assert all(a != b for a, b in itertools.pairwise(texts))
    assert tg.calls_of("sendChatAction", ALICE["id"])


async def test_progress_edits_are_throttled(
    tg: FakeTelegram, tiny_settings: Settings, gen: GatedWorker
) -> None:
    h = Harness(tg, make_settings(tiny_settings, tg, progress_interval=600.0), gen)
    await h.open()
    try:
        await h.say(tg.private_chat(BOB), BOB, "/draw a slow snail")
        await tg.wait_for("sendPhoto")
        await h.settled()
        # the first step turns the status into "Drawing"; the next edit would be 600 s later
        assert len(tg.calls_of("editMessageText")) <= 1
    finally:
        await h.close()


async def test_two_users_are_interleaved_fairly(h: Harness, tg: FakeTelegram, gen: GatedWorker) -> None:
    gen.gate.clear()  # the first job holds the GPU while the others queue up
    alice, bob = tg.private_chat(ALICE), tg.private_chat(BOB)
    for n in (1, 2, 3):
        await h.say(alice, ALICE, f"/draw alice {n}")
    await h.say(bob, BOB, "/draw bob 1")
    bob_status = h.replies(BOB["id"])[0]
    assert "next in line" in bob_status  # right behind the running job, ahead of Alice's others
    gen.gate.set()
    await tg.wait_for("sendPhoto", count=4)
    await h.settled()
    assert gen.prompts == ["alice 1", "bob 1", "alice 2", "alice 3"]
    assert len(tg.calls_of("sendPhoto", ALICE["id"], ok=True)) == 3
    assert len(tg.calls_of("sendPhoto", BOB["id"], ok=True)) == 1


async def test_no_credits_gives_a_clear_message_and_no_job(
    tg: FakeTelegram, tiny_settings: Settings, gen: GatedWorker
) -> None:
    h = Harness(tg, make_settings(tiny_settings, tg, daily_credits=1), gen)
    await h.open()
    try:
        chat = tg.private_chat(ALICE)
        await h.say(chat, ALICE, "/draw two cats --n 2")
        [reply] = h.replies(ALICE["id"])
        assert reply.startswith("Not enough credits: this needs 2, you have 1") and "\n" not in reply
        assert "refill" in reply.lower()
        assert await h.store.user_jobs(ref(ALICE)) == []
        assert tg.calls_of("sendPhoto") == [] and gen.prompts == []
        await h.say(chat, ALICE, "/credits")
        assert h.replies(ALICE["id"])[-1].startswith("You have 1 credit(s) left")
    finally:
        await h.close()


async def test_bad_flags_get_one_line_and_help_lists_commands(h: Harness, tg: FakeTelegram) -> None:
    chat = tg.private_chat(BOB)
    await h.say(chat, BOB, "/draw a cat --steps 9999")
    await h.say(chat, BOB, "/draw")
    await h.say(chat, BOB, "/help")
    too_many, empty, help_text = h.replies(BOB["id"])
    assert too_many == "--steps 9999 is out of range: allowed 1–50"
    assert empty.startswith("The prompt is empty")
    assert "/draw <prompt>" in help_text and "/quota" not in help_text
    default = tg.commands['{"type": "default"}']
    assert [c["command"] for c in default] == ["draw", "credits", "jobs", "queue", "cancel", "help"]
    admin_scope = tg.commands[f'{{"chat_id": {ADA["id"]}, "type": "chat"}}']
    assert {"quota", "ban", "unban", "weight", "stats"} <= {c["command"] for c in admin_scope}


async def test_photo_refused_by_telegram_falls_back_to_a_document(
    tiny_settings: Settings, gen: GatedWorker
) -> None:
    async with FakeTelegram(photo_limit=100) as tg:  # every PNG is "too big" for a photo here
        h = Harness(tg, make_settings(tiny_settings, tg), gen)
        await h.open()
        try:
            await h.say(tg.private_chat(ALICE), ALICE, "/draw a huge mural")
            document = await tg.wait_for("sendDocument")
            await h.settled()
            [job] = await h.store.user_jobs(ref(ALICE))
            assert job.state is JobState.DELIVERED
            assert [c.status for c in tg.calls_of("sendPhoto")] == [400]
            assert document.uploads[0].data == Path(job.outputs[0]).read_bytes()
            assert job_id_of(result_message(tg, document)) == job.id
        finally:
            await h.close()


# ---------------------------------------------------------------------------------- buttons


async def test_buttons_work_after_a_restart_on_the_same_database(
    h: Harness, tg: FakeTelegram, gen: GatedWorker, tmp_path: Path
) -> None:
    gen.gate.clear()
    group, private = tg.group(GROUP, "artists"), tg.private_chat(ALICE)
    await h.say(group, ALICE, "/draw a castle --seed 5")
    await h.say(private, ALICE, "/draw a moat")
    [first_status], [second_status] = tg.bot_messages(GROUP), tg.bot_messages(ALICE["id"])

    await h.restart()  # both jobs are unfinished: re-queued, their status messages reused
    chat = ALICE["id"]
    await tg.wait_until(
        lambda: "Resumed after a restart" in (tg.message(chat, second_status.message_id).text or "")
    )
    answer = await h.press(ALICE, tg.message(chat, second_status.message_id), "Cancel")
    assert answer.params["text"] == "Cancelled"
    assert "cancelled by you" in (tg.message(chat, second_status.message_id).text or "")
    assert not tg.message(chat, second_status.message_id).buttons()

    gen.gate.set()
    photo = result_message(tg, await tg.wait_for("sendPhoto"))
    await h.settled()
    castle = await h.job(photo)
    assert castle.state is JobState.DELIVERED and tg.message(GROUP, first_status.message_id).deleted
    assert (await h.service.credits(ref(ALICE))).available == 9  # the cancelled job was refunded

    await h.restart()
    answer = await h.press(ALICE, photo, "Original PNG")
    assert answer.params["text"] == "Original PNG sent"
    [document] = tg.calls_of("sendDocument", GROUP, ok=True)
    original = document.uploads[0].data
    assert original == Path(castle.outputs[0]).read_bytes()
    copy = tmp_path / "copy.png"
    copy.write_bytes(original)
    parameters = read_parameters(copy)["parameters"]
    assert parameters.startswith("a castle\n") and "Seed: 5" in parameters and "Size: 64x64" in parameters
    with Image.open(io.BytesIO(original)) as img:
        assert img.format == "PNG"

    await h.press(BOB, photo, "Reroll")  # anyone may reroll; it is charged to them
    reroll_photo = result_message(tg, await tg.wait_for("sendPhoto", count=2))
    await h.settled()
    reroll = await h.job(reroll_photo)
    assert reroll.user == ref(BOB) and reroll.request.prompt == "a castle" and reroll.seeds != castle.seeds

    refused = await h.press(BOB, photo, "Delete")
    assert refused.params["show_alert"] is True
    assert refused.params["text"].startswith("Only the person who asked for this image or an admin")
    assert not tg.message(GROUP, photo.message_id).deleted
    await h.press(ALICE, photo, "Delete")
    assert tg.message(GROUP, photo.message_id).deleted


async def test_reroll_in_a_forum_topic_answers_in_that_topic(h: Harness, tg: FakeTelegram) -> None:
    group = tg.group(GROUP, "artists")
    await h.say(group, ALICE, "/draw a lighthouse")
    photo = result_message(tg, await tg.wait_for("sendPhoto"))
    await h.settled()
    # what Telegram says of a bot's message in a forum topic
    photo.data.update(is_topic_message=True, message_thread_id=77)
    await h.press(BOB, photo, "Reroll")
    rerolled = await tg.wait_for("sendPhoto", count=2)
    await h.settled()
    job = await h.job(result_message(tg, rerolled))
    assert job.user == ref(BOB) and job.delivery["thread_id"] == 77
    assert rerolled.params["message_thread_id"] == 77


async def test_presses_are_answered_before_their_slow_work(
    h: Harness, tg: FakeTelegram, gen: GatedWorker
) -> None:
    group = tg.group(GROUP, "artists")
    await h.say(group, ALICE, "/draw a harbour")
    photo = result_message(tg, await tg.wait_for("sendPhoto"))
    await h.settled()
    # the original's upload is held before Telegram sees it: the press is answered meanwhile
    upload = tg.hold("sendDocument", chat_id=GROUP)
    query = tg.press(ALICE, photo, "Original PNG")
    await asyncio.wait_for(upload.arrived.wait(), 10)
    answer = tg.answer(query)
    assert answer is not None and answer.params["text"] == "Original PNG sent"
    upload.release()
    await h.handled()
    assert len(tg.calls_of("sendDocument", GROUP, ok=True)) == 1
    # a cancel of a job on the GPU is answered at once, not when the worker has stopped
    gen.gate.clear()
    await h.press(BOB, photo, "Reroll")
    async with asyncio.timeout(10):
        while len(gen.prompts) < 2:  # the reroll is on the worker, held at its gate
            await asyncio.sleep(0.01)
    await h.handled()
    [status] = [m for m in tg.bot_messages(GROUP) if any("Cancel" in str(b.get("text")) for b in m.buttons())]
    job_id = job_id_of(status)
    stopping = await h.press(BOB, status, "Cancel")
    assert stopping.params["text"] == messages.STOPPING
    gen.gate.set()
    await h.settled()
    assert (await h.service.job(job_id)).state is JobState.CANCELLED


async def test_cancel_by_command_and_by_button_and_the_lists(
    h: Harness, tg: FakeTelegram, gen: GatedWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen.gate.clear()
    chat = tg.private_chat(ALICE)
    await h.say(chat, ALICE, "/draw first")
    await h.say(chat, ALICE, "/draw second")
    await h.say(chat, ALICE, "/queue")
    assert h.replies(ALICE["id"])[-1].startswith("1 job(s) waiting from 1 user(s)\n▶ alice")
    await h.say(chat, ALICE, "/jobs")
    second, first = await h.store.user_jobs(ref(ALICE))
    assert f"{first.id} · drawing" in h.replies(ALICE["id"])[-1]
    assert f"{second.id} · queued, position 1" in h.replies(ALICE["id"])[-1]

    await h.say(chat, ALICE, "/cancel")  # the newest unfinished job
    assert h.replies(ALICE["id"])[-1] == f"Cancelled job {second.id}. {second.credits} credit(s) refunded."
    first_status = tg.bot_messages(ALICE["id"])[0]
    # the job's state in the store at the moment the chat is told it was cancelled
    stored_when_told: list[str] = []
    edit_text = tg._m_editMessageText

    async def spy_edit(p: dict[str, Any], files: dict[str, Any]) -> Any:
        if "cancelled while drawing" in str(p.get("text", "")):
            with sqlite3.connect(h.settings.db_path) as db:
                rows = db.execute("SELECT state FROM jobs WHERE id = ?", (first.id,))
                stored_when_told.extend(state for (state,) in rows)
        return await edit_text(p, files)

    monkeypatch.setattr(tg, "_m_editMessageText", spy_edit)
    answer = await h.press(ALICE, first_status, "Cancel")  # the running one
    assert answer.params["text"] == "Stopping…"
    gen.gate.set()
    await h.settled()
    states = {j.id: j.state for j in await h.store.user_jobs(ref(ALICE))}
    assert states == {first.id: JobState.CANCELLED, second.id: JobState.CANCELLED}
    await tg.wait_until(
        lambda: "cancelled while drawing" in (tg.message(ALICE["id"], first_status.message_id).text or "")
    )
    assert stored_when_told == ["cancelled"]  # the job is final in the store before the chat is told
    assert (await h.service.credits(ref(ALICE))).available == 10
    assert tg.calls_of("sendPhoto") == []


# ---------------------------------------------------------------------------------- admin


async def test_admin_commands_are_refused_to_others_and_work_for_admins(h: Harness, tg: FakeTelegram) -> None:
    group = tg.group(GROUP, "artists")
    hello = await h.say(group, ALICE, "/credits")  # the bot has now seen @alice
    admin_commands = [
        "/quota show @alice",
        "/quota set @alice 5",
        "/quota grant 11 3",
        "/quota reset @alice",
        "/ban @alice",
        "/unban @alice",
        "/weight @alice 2",
        "/stats",
    ]
    for text in admin_commands:
        await h.say(group, BOB, text)
    refusals = h.replies(GROUP)[1:]
    assert refusals == ["Only bot admins can do that"] * len(admin_commands)

    def last() -> str:
        return h.replies(GROUP)[-1]

    await h.say(group, ADA, "/quota set @alice 5")
    assert last().startswith("Allowance set to 5. @alice (telegram:11): 5 credit(s) available")
    await h.say(group, ADA, "/quota grant 11 3")
    assert last().startswith("Granted +3. telegram:11: 8 credit(s) available")
    await h.say(group, ADA, "/quota show", reply_to=hello["message_id"])
    assert "telegram:11" in last() and "8 available" in last() and "grant" in last()
    await h.say(group, ADA, "/quota reset @alice")
    assert last().startswith("Usage reset.")
    await h.say(group, ADA, "/ban", reply_to=hello["message_id"])
    assert last() == "alice (telegram:11) is banned from drawing."
    await h.say(group, ALICE, "/draw a cat")
    assert last() == "You are banned from drawing here"
    await h.say(group, ADA, "/unban @alice")
    assert last() == "@alice (telegram:11) may draw again."
    await h.say(group, ADA, "/weight @alice 2")
    assert last() == "@alice (telegram:11) now has weight 2 in the fair queue."
    await h.say(group, ADA, "/stats")
    assert "queued: 0" in last() and "model: tiny" in last()
    await h.say(group, ADA, "/quota show @nobody_seen")
    assert last().startswith("I have not seen @nobody_seen yet")
    await h.say(group, ADA, "/quota frobnicate")
    assert last().startswith("Usage: /quota show|set|grant|reset")
    record = await h.store.get_user(ref(ALICE))
    assert record is not None and record.weight == 2 and not record.banned


async def test_allowed_chats_restrict_where_the_bot_answers(
    tg: FakeTelegram, tiny_settings: Settings, gen: GatedWorker
) -> None:
    h = Harness(tg, make_settings(tiny_settings, tg, telegram_allowed_chats=[GROUP]), gen)
    await h.open()
    try:
        other = tg.group(-100_222, "elsewhere")
        await h.say(other, ALICE, "/draw a cat")
        await h.say(tg.private_chat(ALICE), ALICE, "/credits")
        assert [c for c in tg.calls if c.chat_id in (other["id"], ALICE["id"])] == []
        await h.say(tg.private_chat(ADA), ADA, "/stats")  # admins keep their private chat
        assert h.replies(ADA["id"])
        await h.say(tg.group(GROUP, "artists"), ALICE, "/credits")
        assert h.replies(GROUP)[0].startswith("You have 10 credit(s) left")
    finally:
        await h.close()


# ---------------------------------------------------------------------------------- robustness


async def test_a_429_storm_is_survived_with_nothing_lost(h: Harness, tg: FakeTelegram) -> None:
    tg.fail("*", retry_after=1, times=3)
    await h.say(tg.private_chat(ALICE), ALICE, "/draw storm one")
    await h.say(tg.private_chat(BOB), BOB, "/draw storm two")
    await tg.wait_for("sendPhoto", lambda c: c.ok, count=2)
    await h.settled()
    assert len([c for c in tg.calls if c.status == 429]) == 3
    for user in (ALICE, BOB):
        [job] = await h.store.user_jobs(ref(user))
        assert job.state is JobState.DELIVERED
        assert len(tg.calls_of("sendPhoto", user["id"], ok=True)) == 1
        # a status message each at most: one still waiting out the 429 when the result is ready gives way to it
        assert len(tg.calls_of("sendMessage", user["id"], ok=True)) <= 1


async def test_bot_removed_from_the_group_mid_job_ends_it_refunded(
    h: Harness, tg: FakeTelegram, gen: GatedWorker
) -> None:
    gen.gate.clear()
    group = tg.group(GROUP, "artists")
    await h.say(group, ALICE, "/draw a fox --n 2")
    assert (await h.service.credits(ref(ALICE))).available == 8
    tg.kick(GROUP)
    gen.gate.set()
    await tg.wait_for("sendMediaGroup")
    await h.settled()
    [job] = await h.store.user_jobs(ref(ALICE))
    assert job.state is JobState.FAILED and "could not be reached" in (job.error or "")
    assert (await h.service.credits(ref(ALICE))).available == 10
    assert not tg.calls_of("sendMediaGroup", ok=True)
    with sqlite3.connect(h.settings.db_path) as db:
        kinds = [k for (k,) in db.execute("SELECT kind FROM ledger WHERE job_id = ? ORDER BY id", (job.id,))]
    assert kinds == ["reserve", "refund"]


async def test_a_refused_result_ends_refunded_and_the_requester_is_told(h: Harness, tg: FakeTelegram) -> None:
    chat = tg.private_chat(ALICE)
    tg.fail("sendPhoto", status=400, description="Bad Request: wrong type of the web page content")
    await h.say(chat, ALICE, "/draw a fox")
    await tg.wait_for("sendPhoto")
    await h.settled()
    [job] = await h.store.user_jobs(ref(ALICE))
    assert job.state is JobState.FAILED and "could not be posted" in (job.error or "")
    assert (await h.service.credits(ref(ALICE))).available == 10
    said = [str(c.params.get("text")) for c in tg.calls if c.chat_id == ALICE["id"] and c.ok
            and c.method in ("sendMessage", "editMessageText")]  # fmt: skip
    told = [t for t in said if "could not be posted" in t]  # (the status message says it)
    assert (
        len(told) == 1 and "wrong type of the web page content" in told[0].lower() and "\n" not in told[0]
    ), told


async def test_the_token_never_reaches_the_logs(
    h: Harness, tg: FakeTelegram, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await h.say(tg.private_chat(ALICE), ALICE, "/draw a quiet pond")
    await tg.wait_for("sendPhoto")
    await h.settled()
    logging.getLogger("telegram.ext.Updater").warning("calling %s", f"{tg.base_url}{tg.token}/getMe")
    assert caplog.records and tg.token not in caplog.text
    assert "[redacted]" in caplog.text
    assert tg.token not in repr(h.adapter) and tg.token not in repr(h.settings)


async def test_a_rejected_token_is_a_config_error_without_the_token(
    tiny_settings: Settings, gen: GatedWorker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeTelegram(token="42:TheRealTokenTheServerKnows_xyz") as tg:
        wrong = register_secret("42:AWrongTokenThatMustNotLeak_abcdef", "a wrong TELEGRAM_TOKEN")
        settings = make_settings(tiny_settings, tg, telegram_token=SecretStr(wrong))
        store = SqliteStore(settings.db_path)
        await store.start()
        service = Service(
            settings=settings, store=store, workers=[gen], sink=ImageStore(settings.output_dir, "tiny")
        )
        adapter = TelegramAdapter(service, settings)
        with pytest.raises(ConfigError) as info:
            await adapter.start()
        await adapter.close()
        await store.close()
    assert "TELEGRAM_TOKEN" in str(info.value) and wrong not in str(info.value)
    assert wrong not in caplog.text
    assert tg.token != DEFAULT_TOKEN


async def test_webhook_mode_without_the_webhooks_extra_is_a_config_error(
    tg: FakeTelegram, tiny_settings: Settings, gen: GatedWorker
) -> None:
    if importlib.util.find_spec("tornado") is not None:
        pytest.skip("python-telegram-bot[webhooks] is installed here")
    h = Harness(
        tg, make_settings(tiny_settings, tg), gen, webhook=Webhook(url="https://bot.example/telegram")
    )
    with pytest.raises(ConfigError, match="webhook mode is not available"):
        await h.open()
    assert h.adapter.closed
    await h.service.close()
    await h.store.close()


# ---------------------------------------------------------------------------------- busy chats

USERS = [FakeTelegram.user(100 + n, f"User{n}", f"user{n}") for n in range(8)]


def photos_in(tg: FakeTelegram, chat_id: int) -> list[ApiCall]:
    return tg.calls_of("sendPhoto", chat_id, ok=True)


async def test_a_quiet_group_still_shows_status_and_progress(h: Harness, tg: FakeTelegram) -> None:
    group = tg.group(GROUP, "artists")
    request = await h.say(group, ALICE, "/draw a quiet pond --steps 8")
    await tg.wait_for("sendPhoto")
    await h.settled()
    statuses = [
        c for c in tg.calls_of("sendMessage", GROUP, ok=True) if "Queued job" in str(c.params["text"])
    ]
    assert len(statuses) == 1
    assert statuses[0].params["reply_parameters"]["message_id"] == request["message_id"]
    progress = [c for c in tg.calls_of("editMessageText", GROUP) if "Drawing job" in str(c.params["text"])]
    assert progress, "a quiet group sees its job's progress"
    assert not [c for c in tg.calls_of("sendMessage", GROUP) if "brushbot ·" in str(c.params["text"])]
    status = tg.message(GROUP, statuses[0].result["message_id"])
    assert status.deleted  # the result took its place


async def test_a_busy_group_folds_status_into_one_board_and_each_result_replies(
    h: Harness, tg: FakeTelegram, gen: GatedWorker
) -> None:
    gen.gate.clear()
    group = tg.group(GROUP, "artists")
    requests = [await h.say(group, user, f"/draw picture {n} --seed {n}") for n, user in enumerate(USERS[:6])]
    board_calls = [
        c for c in tg.calls_of("sendMessage", GROUP, ok=True) if "brushbot ·" in str(c.params["text"])
    ]
    assert len(board_calls) == 1 and "job(s) for this chat" in str(board_calls[0].params["text"])
    queued = [c for c in tg.calls_of("sendMessage", GROUP, ok=True) if "Queued job" in str(c.params["text"])]
    assert len(queued) == 1  # the first job found the group quiet; the others went on the board
    gen.gate.set()
    await tg.wait_for("sendPhoto", count=6)
    await h.settled()
    photos = photos_in(tg, GROUP)
    for n, request in enumerate(requests):
        [photo] = [p for p in photos if p.params["reply_parameters"]["message_id"] == request["message_id"]]
        caption = str(photo.params["caption"])
        assert caption.startswith(f"picture {n}") and f"seed {n}" in caption
    # about one message per image: the photos, the first job's status, the board and a few board edits
    # (the first job's own progress edits are left out: they are sent only from the budget's
    # slack, which this test's short window has plenty of, so their number follows the load)
    spent = [
        f"{c.method}:{str(c.params.get('text', ''))[:30]}"
        for c in tg.counted_calls(GROUP)
        if not str(c.params.get("text", "")).startswith("Drawing job")
    ]
    assert len(spent) <= 6 + 1 + 1 + 2, spent
    await tg.wait_until(lambda: tg.message(GROUP, board_calls[0].result["message_id"]).deleted)


async def test_a_refusal_in_a_busy_group_still_gets_its_line(
    h: Harness, tg: FakeTelegram, gen: GatedWorker
) -> None:
    gen.gate.clear()
    group = tg.group(GROUP, "artists")
    for n, user in enumerate(USERS[:4]):
        await h.say(group, user, f"/draw busy {n}")
    refused = await h.say(group, USERS[5], "/draw too long --steps 9999")
    [line] = [c for c in tg.calls_of("sendMessage", GROUP, ok=True)
              if c.params.get("reply_parameters", {}).get("message_id") == refused["message_id"]]  # fmt: skip
    assert "9999" in str(line.params["text"]) and "\n" not in str(line.params["text"])
    gen.gate.set()
    await tg.wait_for("sendPhoto", count=4)
    await h.settled()


async def test_a_429_that_arrives_anyway_is_honoured_and_nothing_is_lost(
    tiny_settings: Settings, gen: GatedWorker
) -> None:
    # The bot thinks a group takes 20 messages in 2 s; this one takes 3 in 1 s and says so with 429s.
    async with FakeTelegram(group_limit=Limit(calls=3, window=1.0)) as tg:
        h = Harness(tg, make_settings(tiny_settings, tg), gen)
        await h.open()
        try:
            gen.gate.clear()
            group = tg.group(GROUP, "artists")
            for n, user in enumerate(USERS[:5]):
                await h.say(group, user, f"/draw limited {n}")
            gen.gate.set()
            await tg.wait_for("sendPhoto", count=5, timeout=60)
            await h.settled()
            assert tg.rate_limited, "the fake never refused anything: the test tests nothing"
            for user in USERS[:5]:
                [job] = await h.store.user_jobs(ref(user))
                assert job.state is JobState.DELIVERED
            assert len(photos_in(tg, GROUP)) == 5  # each delivered once
        finally:
            await h.close()


async def test_private_chats_are_not_slowed_by_a_busy_groups_backlog(
    tiny_settings: Settings, gen: GatedWorker
) -> None:
    # A group that takes 3 messages in 2 s gets 6 results: its backlog drains for seconds.
    limit = Limit(calls=3, window=2.0)
    async with FakeTelegram(group_limit=limit) as tg:
        h = Harness(
            tg, make_settings(tiny_settings, tg), gen, group_limit=limit.calls, group_window=limit.window
        )
        await h.open()
        try:
            gen.gate.clear()
            group = tg.group(GROUP, "artists")
            for n, user in enumerate(USERS[:6]):
                await h.say(group, user, f"/draw group {n}")
            for user in (ALICE, BOB):
                await h.say(tg.private_chat(user), user, "/draw private")
            gen.gate.set()
            await tg.wait_for("sendPhoto", count=8, timeout=60)
            await h.settled()
            assert not tg.rate_limited
            last_group_photo = max(c.seq for c in photos_in(tg, GROUP))
            for user in (ALICE, BOB):
                [photo] = photos_in(tg, user["id"])
                assert photo.seq < last_group_photo  # delivered while the group's results still waited
        finally:
            await h.close()


async def test_the_same_sentence_reads_the_same_on_telegram_and_the_console(
    h: Harness, tg: FakeTelegram
) -> None:
    from adapters.console import ConsoleAdapter

    out = io.StringIO()
    console = ConsoleAdapter(
        h.service, stdin=io.StringIO(""), stdout=out, user=UserRef(platform="console", id="me")
    )
    chat = tg.private_chat(ALICE)
    lines = ["/draw a fox --steps 9999", "/cancel", "/credits"]
    for line in lines:
        await h.say(chat, ALICE, line)
        try:
            await console.handle(line)
        except Exception as err:  # the console's loop turns core errors into their line
            console.say("⚠ " + messages.error_text(err, h.service.next_refill_text()))
    telegram = h.replies(ALICE["id"])
    shown = [line.removeprefix("⚠ ") for line in out.getvalue().splitlines()]
    assert telegram[:2] == shown[:2]  # the refusal and "nothing to cancel", word for word
    assert telegram[2].split(":")[0] == shown[2].split(":")[0]  # "You have 10 credit(s) left"


# ------------------------------------------------------------------- drawing from a picture

MB = 1024 * 1024


def ledger_rows(h: Harness) -> int:
    with sqlite3.connect(h.settings.db_path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM ledger").fetchone()[0])


async def picture(h: Harness, chat: dict, user: dict, data: bytes, **kw: object) -> dict:
    message = h.tg.inject_picture(chat, user, data, **kw)  # type: ignore[arg-type]
    await h.handled()
    return message


async def test_a_photo_captioned_draw_draws_from_it_and_the_png_names_the_strength(
    h: Harness, tg: FakeTelegram
) -> None:
    group = tg.group(GROUP, "artists")
    photo = encode(gradient(96, 64), "JPEG")
    await picture(h, group, ALICE, photo, caption="/draw a watercolour --strength 0.5 --seed 7")
    assert tg.calls_of("getFile")  # the photo was fetched through the Bot API, by its file id
    result = result_message(tg, await tg.wait_for("sendPhoto"))
    await h.settled()
    job = await h.job(result)
    assert job.state is JobState.DELIVERED and job.user == ref(ALICE)
    assert (job.request.prompt, job.request.strength, job.request.seed) == ("a watercolour", 0.5, 7)
    assert (job.request.width, job.request.height) == (80, 48)  # the 3:2 shape at the model's pixel count
    assert job.request.source is not None
    params = read_parameters(job.outputs[0])["parameters"]
    assert "Denoising strength: 0.5" in params and "Source hash: " in params
    assert str(result.caption).startswith("a watercolour") and "seed 7" in str(result.caption)


async def test_a_reply_to_a_photo_or_to_our_result_draws_from_that_picture(
    h: Harness, tg: FakeTelegram
) -> None:
    group = tg.group(GROUP, "artists")
    theirs = await picture(h, group, BOB, encode(gradient(64, 64, 3), "PNG"), caption="my cat")
    await h.say(group, ALICE, "/draw a cat in space --seed 1", reply_to=theirs["message_id"])
    first = result_message(tg, await tg.wait_for("sendPhoto"))
    await h.settled()
    job = await h.job(first)
    assert job.request.prompt == "a cat in space" and job.request.source is not None
    fetched = len(tg.calls_of("getFile"))
    assert fetched == 1

    # a bare /draw on our own result: a variation of its lossless PNG, with the job's whole prompt
    await h.say(group, BOB, "/draw --strength 0.4", reply_to=first.message_id)
    second = result_message(tg, await tg.wait_for("sendPhoto", count=2))
    await h.settled()
    varied = await h.job(second)
    assert varied.id != job.id and varied.user == ref(BOB)
    assert (varied.request.prompt, varied.request.strength) == ("a cat in space", 0.4)
    assert varied.request.source not in (None, job.request.source)
    assert len(tg.calls_of("getFile")) == fetched  # read from our outputs, not downloaded again


async def test_vary_buttons_draw_variations_and_survive_a_restart(h: Harness, tg: FakeTelegram) -> None:
    group = tg.group(GROUP, "artists")
    await h.say(group, ALICE, "/draw a lighthouse --seed 5")
    result = result_message(tg, await tg.wait_for("sendPhoto"))
    await h.settled()
    original = await h.job(result)

    answer = await h.press(BOB, result, "🌱 Vary (subtle)")
    assert str(answer.params["text"]).startswith("Varying as job ")
    await tg.wait_for("sendPhoto", count=2)
    await h.settled()

    await h.restart()  # buttons carry only the job id: they work on a new process
    answer = await h.press(ALICE, result, "🌀 Vary (strong)")
    assert str(answer.params["text"]).startswith("Varying as job ")
    await tg.wait_for("sendPhoto", count=3)
    await h.settled()
    jobs = {j.id: j for j in await h.store.user_jobs(ref(ALICE))} | {
        j.id: j for j in await h.store.user_jobs(ref(BOB))
    }
    varied = sorted((j for j in jobs.values() if j.id != original.id), key=lambda j: j.created_at)
    assert [(j.user, j.request.strength) for j in varied] == [
        (ref(BOB), VARY_SUBTLE),
        (ref(ALICE), VARY_STRONG),
    ]
    assert all(j.state is JobState.DELIVERED and j.request.prompt == "a lighthouse" for j in varied)
    assert all(j.request.seed is None and j.request.source for j in varied)


async def test_refused_pictures_get_one_line_and_cost_nothing(h: Harness, tg: FakeTelegram) -> None:
    chat = tg.private_chat(ALICE)
    before = ledger_rows(h)
    cases = {
        "a 100 MB file": (
            dict(document="huge.png"), b"\x89PNG\r\n\x1a\n" + bytes(100 * MB), "the picture is 104.9 MB"
        ),
        "a 20000x20000 PNG": (dict(document="bomb.png"), png_header_only(20000, 20000), "the picture has over"),
        "a text file named .png": (
            dict(document="photo.png"), b"just some text, not a picture\n", "that file is not a picture"
        ),
        "a GIF": (
            dict(document="anim.gif", mime_type="image/gif"), encode(gradient(16, 16), "GIF"),
            "GIF pictures are not supported",
        ),
    }  # fmt: skip
    for name, (kw, data, line) in cases.items():
        sent = len(h.replies(chat["id"]))
        await picture(h, chat, ALICE, data, caption="/draw a fox", **kw)
        replies = h.replies(chat["id"])[sent:]
        assert len(replies) == 1, name
        assert line.lower() in replies[0].lower() and "\n" not in replies[0].strip(), (name, replies[0])
    # the 100 MB file was refused from its declared size, never downloaded
    fetched = {c.params.get("file_id") for c in tg.calls_of("getFile")}
    assert len(fetched) == 3
    assert await h.store.user_jobs(ref(ALICE)) == []
    assert ledger_rows(h) == before
    assert not (h.settings.output_dir / "sources").exists()


async def test_a_draw_caption_for_another_bot_is_ignored(h: Harness, tg: FakeTelegram) -> None:
    group = tg.group(GROUP, "artists")
    await picture(h, group, ALICE, encode(gradient(32, 32), "PNG"), caption="/draw@some_other_bot a cat")
    await picture(h, group, ALICE, encode(gradient(32, 32), "PNG"), caption="a holiday photo")
    assert [c for c in tg.calls if c.chat_id == GROUP] == [] and not tg.calls_of("getFile")
    assert await h.store.user_jobs(ref(ALICE)) == []
    assert parse_callback("bb:subtle:abc") == ("subtle", "abc")

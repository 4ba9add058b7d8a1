"""The fakes themselves: Telegram's strict group window and Discord's per-route buckets, as the real
clients see them; a call held in the fake Telegram; where Discord offers a command (its guild,
another, a DM).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from discord.http import HTTPClient, Route, handle_message_parameters
from telegram import Bot
from telegram.error import RetryAfter
from telegram.ext import AIORateLimiter, ExtBot

from tests.fakes.discord_server import DEFAULT_BUCKETS, MANAGE_GUILD, MEMBER_PERMISSIONS, Bucket, FakeDiscord
from tests.fakes.telegram_server import PRIVATE_LIMIT, FakeTelegram, Limit

GROUP = -100_222
ALICE = FakeTelegram.user(11, "Alice", "alice")
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _loopback_without_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("PTB_TIMEDELTA", "1")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# ---------------------------------------------------------------------------------- Telegram


class Api:
    """Raw Bot API calls against the fake, as JSON bodies."""

    def __init__(self, tg: FakeTelegram, session: aiohttp.ClientSession) -> None:
        self.tg = tg
        self.session = session

    async def __call__(self, method: str, **params: Any) -> tuple[int, dict[str, Any]]:
        url = f"{self.tg.base_url}{self.tg.token}/{method}"
        async with self.session.post(url, json=params) as response:
            return response.status, await response.json()

    async def send(self, chat_id: int, text: str = "hi") -> tuple[int, dict[str, Any]]:
        return await self("sendMessage", chat_id=chat_id, text=text)

    async def photo(self, chat_id: int) -> tuple[int, dict[str, Any]]:
        url = f"{self.tg.base_url}{self.tg.token}/sendPhoto"
        form = aiohttp.FormData()
        form.add_field("chat_id", str(chat_id))
        form.add_field("photo", PNG, filename="p.png", content_type="image/png")
        async with self.session.post(url, data=form) as response:
            return response.status, await response.json()

    async def album(self, chat_id: int, items: int) -> tuple[int, dict[str, Any]]:
        url = f"{self.tg.base_url}{self.tg.token}/sendMediaGroup"
        form = aiohttp.FormData()
        form.add_field("chat_id", str(chat_id))
        media = [{"type": "photo", "media": f"attach://p{i}"} for i in range(items)]
        form.add_field("media", json.dumps(media))
        for i in range(items):
            form.add_field(f"p{i}", PNG, filename=f"p{i}.png", content_type="image/png")
        async with self.session.post(url, data=form) as response:
            return response.status, await response.json()


async def test_the_group_limit_is_a_sliding_window_with_the_real_retry_after(
    http: aiohttp.ClientSession,
) -> None:
    clock = Clock()
    async with FakeTelegram(group_limit=Limit(calls=3, window=10.0), clock=clock) as tg:
        tg.group(GROUP, "busy")
        api = Api(tg, http)
        for offset in (0.0, 2.0, 4.0):  # three messages at t = 0, 2, 4
            clock.now = 1000.0 + offset
            assert (await api.send(GROUP))[0] == 200
        clock.now = 1005.0
        status, body = await api.send(GROUP, "over")
        assert status == 429
        assert body == {
            "ok": False,
            "error_code": 429,
            "description": "Too Many Requests: retry after 5",
            "parameters": {"retry_after": 5},  # the t=0 slot frees at t=10
        }
        clock.now = 1009.2
        assert (await api.send(GROUP))[1]["parameters"]["retry_after"] == 1  # 0.8 s, rounded up
        clock.now = 1010.0  # the first slot is free again, and only that one
        assert (await api.send(GROUP, "fits"))[0] == 200
        clock.now = 1010.5
        assert (await api.send(GROUP))[1]["parameters"]["retry_after"] == 2  # the t=2 slot frees at t=12
        # refused calls took no slot, made no message, and are on record
        assert [m.text for m in tg.bot_messages(GROUP)] == ["hi", "hi", "hi", "fits"]
        assert tg.counted(GROUP) == 4 and tg.counted_per_chat() == {GROUP: 4}
        assert [c.retry_after for c in tg.rate_limited] == [5, 1, 2]
        assert all(c.limited and c.counted == 0 for c in tg.rate_limited)
        assert tg.busiest_window(GROUP, 10.0) == 3


async def test_album_items_edits_and_reactions_count_deletes_do_not(http: aiohttp.ClientSession) -> None:
    clock = Clock()
    async with FakeTelegram(group_limit=Limit(calls=6, window=60.0), clock=clock) as tg:
        tg.group(GROUP, "busy")
        api = Api(tg, http)
        status, _ = await api.album(GROUP, 3)
        assert status == 200 and tg.counted(GROUP) == 3
        status, body = await api.album(GROUP, 4)  # 3 + 4 > 6: refused whole
        assert status == 429 and body["parameters"]["retry_after"] == 60
        assert len(tg.bot_messages(GROUP)) == 3
        _, sent = await api.send(GROUP, "status")
        message_id = sent["result"]["message_id"]
        assert (await api("editMessageText", chat_id=GROUP, message_id=message_id, text="50%"))[0] == 200
        reaction = [{"type": "emoji", "emoji": "👍"}]
        react = await api("setMessageReaction", chat_id=GROUP, message_id=message_id, reaction=reaction)
        assert react[0] == 200 and tg.message(GROUP, message_id).reaction == reaction
        assert tg.counted(GROUP) == 6
        # full: another edit is refused, a delete is not counted and still works
        assert (await api("editMessageText", chat_id=GROUP, message_id=message_id, text="90%"))[0] == 429
        assert (await api("deleteMessage", chat_id=GROUP, message_id=message_id))[0] == 200
        assert (await api("sendChatAction", chat_id=GROUP, action="typing"))[0] == 200
        assert tg.counted(GROUP) == 6 and len(tg.rate_limited) == 2
        # each group has its own window; a test can start one with its budget spent
        tg.group(GROUP - 1, "quiet")
        assert (await api.send(GROUP - 1))[0] == 200 and tg.counted(GROUP - 1) == 1
        clock.now += 30.0
        tg.use_slots(GROUP - 1, 5)
        status, body = await api.send(GROUP - 1)
        assert status == 429 and body["parameters"]["retry_after"] == 30  # the first message's slot
        assert [c.method for c in tg.counted_calls(GROUP)] == [
            "sendMediaGroup",
            "sendMessage",
            "editMessageText",
            "setMessageReaction",
        ]


async def test_deletes_count_when_asked_and_private_chats_only_with_a_limit(
    http: aiohttp.ClientSession,
) -> None:
    clock = Clock()
    async with FakeTelegram(group_limit=Limit(calls=2, window=60.0), count_deletes=True, clock=clock) as tg:
        tg.group(GROUP, "busy")
        tg.private_chat(ALICE)
        api = Api(tg, http)
        _, sent = await api.send(GROUP)
        assert (await api("deleteMessage", chat_id=GROUP, message_id=sent["result"]["message_id"]))[0] == 200
        assert (await api.send(GROUP))[0] == 429  # the delete took the second slot
        for _ in range(5):  # no private limit unless asked for
            assert (await api.send(ALICE["id"]))[0] == 200
        assert not [c for c in tg.rate_limited if c.chat_id == ALICE["id"]]
    async with FakeTelegram(private_limit=PRIVATE_LIMIT, clock=clock) as tg:
        tg.private_chat(ALICE)
        api = Api(tg, http)
        assert (await api.send(ALICE["id"]))[0] == 200
        status, body = await api.send(ALICE["id"])
        assert status == 429 and body["parameters"]["retry_after"] == 1
        clock.now += 1.0
        assert (await api.send(ALICE["id"]))[0] == 200


async def test_a_held_call_is_applied_first_and_only_its_answer_waits(http: aiohttp.ClientSession) -> None:
    async with FakeTelegram() as tg:
        tg.group(GROUP, "artists")
        tg.private_chat(ALICE)
        api = Api(tg, http)
        hold = tg.hold("sendPhoto", chat_id=ALICE["id"], applied=True)
        assert (await api.photo(GROUP))[0] == 200  # another chat: not held
        sending = asyncio.create_task(api.photo(ALICE["id"]))
        await asyncio.wait_for(hold.arrived.wait(), 10)
        # Telegram acted on it: the photo is in the chat and the call recorded, answered 200 ...
        [photo] = tg.bot_messages(ALICE["id"])
        assert hold.call is not None and hold.call.ok and hold.call.result["message_id"] == photo.message_id
        assert tg.calls_of("sendPhoto", ALICE["id"], ok=True) == [hold.call]
        await asyncio.sleep(0.05)
        assert not sending.done()  # ... but the answer has not reached the client
        hold.release()
        status, body = await asyncio.wait_for(sending, 10)
        assert status == 200 and body["result"]["message_id"] == photo.message_id
        assert (await api.photo(ALICE["id"]))[0] == 200  # a hold takes one call
        # dropped after it was applied: the message is there, the client never hears
        lost = tg.hold("sendPhoto", chat_id=ALICE["id"], applied=True)
        sending = asyncio.create_task(api.photo(ALICE["id"]))
        await asyncio.wait_for(lost.arrived.wait(), 10)
        lost.drop()
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(sending, 10)
        assert len(tg.bot_messages(ALICE["id"])) == 3
        # held before Telegram saw it, then dropped: never applied
        before = tg.hold("sendPhoto", chat_id=GROUP)
        sending = asyncio.create_task(api.photo(GROUP))
        await asyncio.wait_for(before.arrived.wait(), 10)
        assert before.call is None and len(tg.bot_messages(GROUP)) == 1
        before.drop()
        assert (await asyncio.wait_for(sending, 10))[0] == 502
        assert len(tg.bot_messages(GROUP)) == 1
        # a call still held when the fake closes is let go
        last = tg.hold("sendPhoto", applied=True)
        sending = asyncio.create_task(api.photo(GROUP))
        await asyncio.wait_for(last.arrived.wait(), 10)
    assert (await asyncio.wait_for(sending, 10))[0] == 200


@pytest.mark.logs_secrets(
    "FakeTelegram bot token",
    reason="PTB's own Bot with none of the adapter's redaction: it and httpx log URLs holding the token",
)
async def test_python_telegram_bot_reads_retry_after_and_its_limiter_retries() -> None:
    async with FakeTelegram(group_limit=Limit(calls=2, window=1.0)) as tg:
        tg.group(GROUP, "busy")
        # the plain Bot raises RetryAfter with the whole seconds Telegram sent
        async with Bot(tg.token, base_url=tg.base_url) as bot:
            await bot.send_message(GROUP, "one")
            await bot.send_message(GROUP, "two")
            with pytest.raises(RetryAfter) as raised:
                await bot.send_message(GROUP, "three")
            assert raised.value.retry_after == dt.timedelta(seconds=1)
        assert len(tg.rate_limited) == 1
        # AIORateLimiter sleeps retry_after + 0.1 s and sends it again: delivered, one more 429
        limiter = AIORateLimiter(overall_max_rate=0, group_max_rate=0, max_retries=2)
        async with ExtBot(tg.token, base_url=tg.base_url, rate_limiter=limiter) as ext:
            await ext.send_message(GROUP, "four")
        assert [m.text for m in tg.bot_messages(GROUP)] == ["one", "two", "four"]
        assert len(tg.rate_limited) == 2 and tg.busiest_window(GROUP, 1.0) <= 2


# ---------------------------------------------------------------------------------- Discord


class Rest:
    """Raw REST calls against the fake Discord, with the bot token."""

    def __init__(self, fake: FakeDiscord, session: aiohttp.ClientSession) -> None:
        self.fake = fake
        self.session = session

    async def __call__(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
        headers = {"Authorization": f"Bot {self.fake.token}"}
        async with self.session.request(method, self.fake.url + path, json=body, headers=headers) as response:
            data = await response.json() if response.content_type == "application/json" else None
            return response.status, dict(response.headers), data


async def test_discord_headers_and_429_per_route_and_channel(http: aiohttp.ClientSession) -> None:
    clock = Clock()
    async with FakeDiscord(clock=clock) as fake:
        rest = Rest(fake, http)
        other = fake.add_channel("other")
        post = f"/channels/{fake.general.id}/messages"
        seen = []
        for n in range(5):
            clock.now = 1000.0 + n * 0.5
            status, headers, _ = await rest("POST", post, {"content": f"m{n}"})
            assert status == 200
            seen.append((headers["X-RateLimit-Remaining"], headers["X-RateLimit-Reset-After"]))
            assert headers["X-RateLimit-Limit"] == "5"
            assert float(headers["X-RateLimit-Reset"]) > 1e9  # epoch seconds
        assert seen == [("4", "5.000"), ("3", "4.500"), ("2", "4.000"), ("1", "3.500"), ("0", "3.000")]
        clock.now = 1003.25
        status, headers, body = await rest("POST", post, {"content": "over"})
        assert status == 429
        assert body == {"message": "You are being rate limited.", "retry_after": 1.75, "global": False}
        assert headers["Retry-After"] == "2" and headers["X-RateLimit-Scope"] == "user"
        assert headers["X-RateLimit-Remaining"] == "0" and headers["Via"]
        bucket = headers["X-RateLimit-Bucket"]
        assert len(fake.channel_messages(fake.general.id)) == 5  # the refused one made nothing
        # another channel is another window of the same bucket; an edit is another bucket
        status, headers, created = await rest("POST", f"/channels/{other.id}/messages", {"content": "x"})
        assert status == 200 and headers["X-RateLimit-Remaining"] == "4"
        assert headers["X-RateLimit-Bucket"] == bucket
        status, headers, _ = await rest(
            "PATCH", f"/channels/{other.id}/messages/{created['id']}", {"content": "y"}
        )
        assert status == 200 and headers["X-RateLimit-Bucket"] != bucket
        # the window ends 5 s after its first request
        clock.now = 1005.0
        status, headers, _ = await rest("POST", post, {"content": "again"})
        assert status == 200 and headers["X-RateLimit-Remaining"] == "4"
        assert [(r.method, r.bucket) for r in fake.rate_limited] == [("POST", "channel-message-create")]
        assert len(fake.writes(fake.general.id)) == 6 and len(fake.writes(other.id)) == 2


def test_discord_buckets_are_keyed_like_discord_py_routes() -> None:
    fake = FakeDiscord(buckets={"POST /channels/{channel_id}/messages": Bucket(name="c", limit=2, per=1.0)})
    assert fake.bucket_of("POST", "/channels/42/messages") == (Bucket(name="c", limit=2, per=1.0), "42")
    webhook, major = fake.bucket_of("PATCH", "/webhooks/7/tok/messages/@original")
    assert (webhook, major) == (DEFAULT_BUCKETS["POST /webhooks/{webhook_id}/{webhook_token}"], "7+tok")
    assert fake.bucket_of("POST", "/webhooks/7/tok")[0] == webhook  # follow-ups share the token's bucket
    callback, major = fake.bucket_of("POST", "/interactions/9/tok/callback")
    assert callback.name == "interaction-callback" and major == "9+tok"
    assert fake.bucket_of("PUT", "/applications/1/guilds/5/commands")[1] == "5"
    other, major = fake.bucket_of("GET", "/users/@me")
    assert (other.limit, other.per, major) == (50, 1.0, "")
    channel, major = fake.bucket_of("GET", "/channels/42")
    assert (channel.name, major) == ("GET /channels/{id}", "42")
    assert fake.bucket_of("GET", "/channels/43")[0].hash == channel.hash
    # the same route's route key and major parameters, as discord.py computes them
    route = Route(
        "PATCH",
        "/webhooks/{webhook_id}/{webhook_token}/messages/@original",
        webhook_id=7,
        webhook_token="tok",
    )
    assert route.major_parameters == "7+tok"


async def test_discord_py_waits_on_the_headers_and_retries_a_429(
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = Bucket(name="channel-message-create", limit=2, per=0.3)
    async with FakeDiscord(buckets={"POST /channels/{channel_id}/messages": small}) as fake:
        monkeypatch.setattr(Route, "BASE", fake.url)
        client = HTTPClient(asyncio.get_running_loop())
        try:
            await client.static_login(fake.token)
            channel = fake.general.id

            async def send(text: str) -> None:
                with handle_message_parameters(content=text) as params:
                    await client.send_message(channel, params=params)

            # someone else spent the window before discord.py knew the bucket: it meets a 429,
            # sleeps retry_after and sends again
            rest = Rest(fake, http)
            for _ in range(2):
                assert (await rest("POST", f"/channels/{channel}/messages", {"content": "x"}))[0] == 200
            await send("after the 429")
            assert [r.json["content"] for r in fake.rate_limited] == ["after the 429"]
            assert fake.channel_messages(channel)[-1]["content"] == "after the 429"
            # now it knows the bucket: one after another, it waits whenever Remaining hits 0
            for n in range(5):
                await send(f"m{n}")
            assert len(fake.rate_limited) == 1
            # six at once: its lock-free wake-up can let a third into a window of two (a 429 Discord
            # would send too), and it retries that one: all six arrive
            await asyncio.gather(*(send(f"c{n}") for n in range(6)))
            contents = [m["content"] for m in fake.channel_messages(channel)]
            assert contents[3:8] == [f"m{n}" for n in range(5)]
            assert sorted(contents[8:]) == [f"c{n}" for n in range(6)]
            retried = [r.json["content"] for r in fake.rate_limited[1:]]
            assert all(contents.count(text) == 1 for text in retried)
        finally:
            await client.close()


async def test_discord_offers_a_command_only_where_it_was_synced_and_its_contexts_allow() -> None:
    async with FakeDiscord() as fake:
        user = fake.add_user("user")
        elsewhere = fake.add_guild("Elsewhere", owner=fake.add_user("stranger"))
        lobby = fake.add_channel("lobby", guild=elsewhere)
        guild_only = {"id": "1", "name": "brush", "type": 1, "contexts": [0], "dm_permission": False}
        fake.commands[fake.guild_id] = [guild_only]
        with pytest.raises(KeyError, match="not synced here"):  # synced to our guild only
            await fake.slash("brush", user, channel=lobby)
        fake.commands[None] = [dict(guild_only, id="2")]
        assert fake._command("brush", channel=lobby) == (fake.commands[None][0], None)
        assert fake._command("brush") == (guild_only, fake.guild_id)  # its own guild's first
        dm = fake.dm_channel(user)
        assert dm is fake.dm_channel(user) and dm.to_json()["type"] == 1 and dm.guild_id is None
        with pytest.raises(KeyError, match="forged=True"):  # guild-only: the client never offers it there
            await fake.slash("brush", user, channel=dm)
        assert fake._command("brush", channel=dm, forged=True)[0]["name"] == "brush"
        assert elsewhere.permissions[elsewhere.owner_id] & MANAGE_GUILD  # the owner may do anything there
        fake.join(elsewhere, user)
        assert elsewhere.permissions[user.id] == MEMBER_PERMISSIONS

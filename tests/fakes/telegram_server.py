"""A fake Telegram Bot API server (aiohttp on 127.0.0.1) that records every call, for tests and benchmarks.

Point python-telegram-bot at it with ``ApplicationBuilder().base_url(fake.base_url)`` (brushbot: the
``TELEGRAM_BASE_URL`` setting). It keeps chats, messages and pending updates in memory, answers the
methods the bot uses the way Telegram does (including "message is not modified" and "message to edit
not found"), parks ``getUpdates`` long polls until an update is injected, records each call with its
decoded parameters and uploaded files (bytes included), and can inject errors: 429 with
``retry_after``, 400, 403, or a chat that kicked the bot. ``hold`` keeps one call in the fake until
the test lets it go: before Telegram acts on it, or after, with only its answer held (the message
is there; the bot has not heard), as a crash at that moment leaves things.

It enforces Telegram's flood limits the strict way: at most ``group_limit.calls`` counted calls
in any ``group_limit.window`` seconds per group chat (20 in 60 s by default), where each message
sent, each album item, each edit and each reaction counts (``COUNTED_METHODS``). A call over the
limit is answered 429 with ``parameters.retry_after`` = the whole seconds until a slot frees, takes
no slot and creates nothing; it is kept in ``rate_limited`` so a test can assert there was none.
A private-chat limit (about one a second on Telegram) is off unless ``private_limit`` is given.

    async with FakeTelegram() as tg:
        group = tg.group(-1001, "artists")
        alice = tg.user(11, "Alice", "alice")
        tg.inject_message(group, alice, "/draw a fox")
        call = await tg.wait_for("sendPhoto")
        call.uploads[0].data  # the uploaded bytes
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import re
import struct
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web

from tests.leaks import register_secret

DEFAULT_TOKEN = "123456789:AAFakeTokenForBrushbotTests_0123456789"

#: parameters that the Bot API takes as JSON-serialised values
_JSON_FIELDS = frozenset(
    {
        "reply_markup",
        "reply_parameters",
        "media",
        "commands",
        "scope",
        "allowed_updates",
        "entities",
        "caption_entities",
        "link_preview_options",
        "message_ids",
        "reaction",
    }
)
_INT_FIELDS = frozenset(
    {"chat_id", "message_id", "message_thread_id", "offset", "limit", "user_id", "cache_time", "from_chat_id"}
)
_FLOAT_FIELDS = frozenset({"timeout"})
_BOOL_FIELDS = frozenset(
    {
        "show_alert",
        "disable_notification",
        "protect_content",
        "drop_pending_updates",
        "has_spoiler",
        "disable_content_type_detection",
        "allow_sending_without_reply",
        "is_big",
    }
)
#: methods that post or change a message: each takes a slot of the chat's limit (an album, one per item)
COUNTED_METHODS = frozenset(
    {
        "sendMessage",
        "sendPhoto",
        "sendDocument",
        "sendAnimation",
        "sendVideo",
        "sendAudio",
        "sendVoice",
        "sendVideoNote",
        "sendSticker",
        "sendPaidMedia",
        "sendLocation",
        "sendVenue",
        "sendContact",
        "sendPoll",
        "sendDice",
        "sendMediaGroup",
        "copyMessage",
        "copyMessages",
        "forwardMessage",
        "forwardMessages",
        "editMessageText",
        "editMessageCaption",
        "editMessageMedia",
        "editMessageReplyMarkup",
        "editMessageLiveLocation",
        "setMessageReaction",
    }
)
#: recorded like every call, counted only with ``count_deletes=True``
DELETE_METHODS = frozenset({"deleteMessage", "deleteMessages"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Limit:
    """At most ``calls`` counted calls in any ``window`` seconds, per chat."""

    calls: int
    window: float

    def __post_init__(self) -> None:
        if self.calls < 1 or self.window <= 0:
            raise ValueError(f"a limit needs calls >= 1 and window > 0, not {self.calls} per {self.window}")


#: the Bot API's group limit read strictly: 20 messages in any 60 s
GROUP_LIMIT = Limit(calls=20, window=60.0)
#: about one message a second in a private chat (not enforced unless asked for)
PRIVATE_LIMIT = Limit(calls=1, window=1.0)

_NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup are "
    "exactly the same as a current content and reply markup of the message"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Upload:
    """One file part of a multipart request."""

    field: str
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiCall:
    """One recorded request and what the fake answered."""

    seq: int
    method: str
    params: Mapping[str, Any]
    files: Mapping[str, Upload]
    status: int
    result: Any = None
    description: str | None = None
    at: float = 0.0  # the fake's clock (time.monotonic() unless given) when answered
    parameters: Mapping[str, Any] | None = None  # of an error answer
    counted: int = 0  # slots of its chat's limit it took (album items each count)
    limited: bool = False  # refused with 429 by the fake's flood limit (not an injected error)

    @property
    def retry_after(self) -> int | None:
        """The ``retry_after`` of a 429 answer."""
        value = (self.parameters or {}).get("retry_after")
        return value if isinstance(value, int) else None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def chat_id(self) -> int | None:
        value = self.params.get("chat_id")
        return value if isinstance(value, int) else None

    @property
    def uploads(self) -> list[Upload]:
        """The uploaded files in order: ``attach://`` references of ``media`` first, then the rest."""
        out: list[Upload] = []
        media = self.params.get("media")
        items = media if isinstance(media, list) else [media] if isinstance(media, dict) else []
        for item in items:
            ref = item.get("media") if isinstance(item, dict) else None
            if isinstance(ref, str) and ref.startswith("attach://") and ref[9:] in self.files:
                out.append(self.files[ref[9:]])
        out.extend(f for f in self.files.values() if f not in out)
        return out


@dataclass(slots=True)
class StoredMessage:
    """A message as the fake keeps it; ``data`` is the Bot API ``Message`` object."""

    chat_id: int
    message_id: int
    from_bot: bool
    data: dict[str, Any]
    deleted: bool = False
    reaction: list[dict[str, Any]] | None = None  # the bot's reaction (setMessageReaction)

    @property
    def text(self) -> str | None:
        return self.data.get("text")

    @property
    def caption(self) -> str | None:
        return self.data.get("caption")

    @property
    def reply_markup(self) -> dict[str, Any] | None:
        return self.data.get("reply_markup")

    def buttons(self) -> list[dict[str, Any]]:
        """The inline buttons, row by row flattened."""
        markup = self.reply_markup or {}
        return [button for row in markup.get("inline_keyboard", []) for button in row]


@dataclass(slots=True, kw_only=True)
class _Rule:
    method: str  # "*" = any method but getUpdates
    status: int
    description: str
    parameters: dict[str, Any] | None
    times: int
    chat_id: int | None


class Hold:
    """The next call of ``method`` (to ``chat_id`` when given) waits in the fake (``FakeTelegram.hold``).

    Held ``before`` Telegram acts on it, ``drop()`` loses it the way a crash loses a send in flight
    (never applied; answered 502 to nobody); held ``after`` (``applied``), the message is posted and
    the call recorded, and only the answer waits: ``release()`` sends it, ``drop()`` closes the
    connection instead. ``await hold.arrived.wait()`` to see it come in; ``call`` is the recorded
    call once Telegram acted on it.
    """

    def __init__(self, method: str, chat_id: int | None, *, applied: bool) -> None:
        self.method = method
        self.chat_id = chat_id
        self.applied = applied
        self.params: Mapping[str, Any] | None = None  # the held call's parameters, once it arrived
        self.call: ApiCall | None = None
        self.arrived = asyncio.Event()
        self.dropped = False
        self._let_go = asyncio.Event()

    def matches(self, method: str, params: Mapping[str, Any]) -> bool:
        return (
            self.params is None
            and method == self.method
            and (self.chat_id is None or params.get("chat_id") == self.chat_id)
        )

    async def wait(self) -> None:
        self.arrived.set()
        await self._let_go.wait()

    def release(self) -> None:
        self._let_go.set()

    def drop(self) -> None:
        self.dropped = True
        self._let_go.set()


class _ApiError(Exception):
    def __init__(
        self,
        status: int,
        description: str,
        parameters: dict[str, Any] | None = None,
        *,
        limited: bool = False,
    ) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.parameters = parameters
        self.limited = limited


def _image_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG (from its IHDR chunk); (0, 0) for anything else."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    return 0, 0


def _decode(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if name in _JSON_FIELDS:
            return json.loads(value)
        if name in _INT_FIELDS and re.fullmatch(r"-?\d+", value):
            return int(value)
        if name in _FLOAT_FIELDS:
            return float(value)
        if name in _BOOL_FIELDS:
            return value.lower() == "true"
    except ValueError:
        return value
    return value


def _markup(value: Any) -> dict[str, Any] | None:
    """Only a non-empty inline keyboard shows up in a message."""
    if isinstance(value, dict) and value.get("inline_keyboard"):
        return value
    return None


class FakeTelegram:
    """The fake Bot API server; an async context manager (``start``/``close``)."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        bot_username: str = "brushbot_test_bot",
        photo_limit: int = 10 * 1024 * 1024,
        document_limit: int = 50 * 1024 * 1024,
        group_limit: Limit | None = GROUP_LIMIT,
        private_limit: Limit | None = None,
        counted_methods: Collection[str] = COUNTED_METHODS,
        count_deletes: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``group_limit``/``private_limit``: the flood limits per chat (None: not enforced);
        ``counted_methods``: what takes a slot (``count_deletes`` adds the deletes); ``clock``
        (seconds, monotonic) lets a test move time by hand.
        """
        self.token = register_secret(token, "FakeTelegram bot token")
        self.bot_id = int(token.split(":", 1)[0])
        self.bot_username = bot_username
        self.photo_limit = photo_limit
        self.document_limit = document_limit
        self.me: dict[str, Any] = {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": "brushbot",
            "username": bot_username,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }
        self.group_limit = group_limit
        self.private_limit = private_limit
        self.counted_methods = frozenset(counted_methods) | (DELETE_METHODS if count_deletes else frozenset())
        self._clock = clock
        self.calls: list[ApiCall] = []
        #: calls the flood limit refused with 429 (injected errors are not here)
        self.rate_limited: list[ApiCall] = []
        #: per chat, when each slot in its current window was taken (one stamp per counted unit)
        self._slots: dict[int, deque[float]] = {}
        self.chats: dict[int, dict[str, Any]] = {}
        self.messages: dict[tuple[int, int], StoredMessage] = {}
        self.files: dict[str, Upload] = {}
        self.commands: dict[str, list[dict[str, Any]]] = {}
        self.kicked: set[int] = set()
        self.updates: list[dict[str, Any]] = []
        self._rules: list[_Rule] = []
        self._holds: list[Hold] = []
        self._open_callbacks: set[str] = set()
        self._next_update = 1
        #: the newest update the client confirmed by asking for the ones after it
        self.confirmed_update_id = 0
        self._next_message: dict[int, int] = {}
        self._ids = itertools.count(1)
        self._cond = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._runner: web.AppRunner | None = None
        self._port = 0

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FakeTelegram:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        app.router.add_route("*", "/file/bot{token}/{path:.*}", self._file)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        """Release parked long polls and held calls (one not yet applied is dropped), then stop the server."""
        self._closing = True
        for hold in self._holds:
            if not hold.applied:
                hold.drop()
            hold.release()
        async with self._cond:
            self._cond.notify_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        """What ``TELEGRAM_BASE_URL`` should be (the token is appended by the library)."""
        return f"http://127.0.0.1:{self._port}/bot"

    @property
    def base_file_url(self) -> str:
        """What ``TELEGRAM_BASE_FILE_URL`` should be."""
        return f"http://127.0.0.1:{self._port}/file/bot"

    # ------------------------------------------------------------------ building the world

    @staticmethod
    def user(user_id: int, first_name: str, username: str | None = None) -> dict[str, Any]:
        """A Bot API ``User`` of a person."""
        user: dict[str, Any] = {"id": user_id, "is_bot": False, "first_name": first_name}
        if username:
            user["username"] = username
        return user

    def private_chat(self, user: Mapping[str, Any]) -> dict[str, Any]:
        """The private chat with ``user`` (its id is the user's id)."""
        chat = {"id": user["id"], "type": "private", "first_name": user["first_name"]}
        if "username" in user:
            chat["username"] = user["username"]
        self.chats[chat["id"]] = chat
        return chat

    def group(self, chat_id: int, title: str, *, supergroup: bool = True) -> dict[str, Any]:
        """A group the bot is a member of (ids of groups are negative)."""
        chat = {"id": chat_id, "type": "supergroup" if supergroup else "group", "title": title}
        self.chats[chat_id] = chat
        return chat

    def kick(self, chat_id: int) -> None:
        """The bot is removed from (or blocked in) the chat: every later call to it gets 403."""
        self.kicked.add(chat_id)

    def fail(
        self,
        method: str,
        *,
        status: int = 400,
        description: str | None = None,
        retry_after: float | None = None,
        parameters: dict[str, Any] | None = None,
        times: int = 1,
        chat_id: int | None = None,
    ) -> None:
        """Answer the next ``times`` calls of ``method`` ("*" = any but getUpdates) with an error.

        ``retry_after`` makes it a flood-control 429 (``parameters.retry_after``).
        """
        params = dict(parameters or {})
        if retry_after is not None:
            status = 429
            params["retry_after"] = retry_after
        default = {
            429: f"Too Many Requests: retry after {retry_after}",
            400: "Bad Request: injected error",
            403: "Forbidden: bot was kicked from the group chat",
        }.get(status, "Injected error")
        self._rules.append(
            _Rule(
                method=method,
                status=status,
                description=description or default,
                parameters=params or None,
                times=times,
                chat_id=chat_id,
            )
        )

    def hold(self, method: str, *, chat_id: int | None = None, applied: bool = False) -> Hold:
        """Hold the next call of ``method`` (to ``chat_id`` when given) until the test lets it go.

        With ``applied`` the fake acts on it first (the photo is posted, the call recorded with its
        answer) and holds only that answer.
        """
        hold = Hold(method, chat_id, applied=applied)
        self._holds.append(hold)
        return hold

    def inject_update(self, update: dict[str, Any]) -> dict[str, Any]:
        """Queue a raw update (``update_id`` is assigned) and wake a parked long poll."""
        update = {**update, "update_id": self._next_update}
        self._next_update += 1
        self.updates.append(update)
        self._notify_soon()
        return update

    def inject_message(
        self,
        chat: Mapping[str, Any],
        user: Mapping[str, Any],
        text: str,
        *,
        reply_to: int | None = None,
    ) -> dict[str, Any]:
        """A person sends ``text`` in ``chat``; a leading ``/command`` gets its ``bot_command`` entity."""
        chat_id = int(chat["id"])
        self.chats.setdefault(chat_id, dict(chat))
        message: dict[str, Any] = {
            "message_id": self._new_message_id(chat_id),
            "date": int(time.time()),
            "chat": dict(chat),
            "from": dict(user),
            "text": text,
        }
        if text.startswith("/"):
            command = text.split(maxsplit=1)[0]
            length = len(command.encode("utf-16-le")) // 2
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": length}]
        if reply_to is not None:
            replied = self.messages.get((chat_id, reply_to))
            if replied is not None and not replied.deleted:
                message["reply_to_message"] = dict(replied.data)
        self.messages[(chat_id, message["message_id"])] = StoredMessage(
            chat_id=chat_id, message_id=message["message_id"], from_bot=False, data=message
        )
        self.inject_update({"message": message})
        return message

    def inject_picture(
        self,
        chat: Mapping[str, Any],
        user: Mapping[str, Any],
        data: bytes,
        *,
        caption: str | None = None,
        document: str | None = None,
        mime_type: str = "image/png",
        reply_to: int | None = None,
    ) -> dict[str, Any]:
        """A person sends a photo (or, with ``document=<file name>``, a file) with an optional caption.

        The bytes are kept as a file the bot can fetch with ``getFile``; a photo is listed in two
        sizes as Telegram does (the thumbnail cannot be fetched). A leading ``/command`` in the
        caption gets its ``bot_command`` caption entity.
        """
        chat_id = int(chat["id"])
        self.chats.setdefault(chat_id, dict(chat))
        upload = Upload(field="photo", filename=document or "photo.jpg", content_type=mime_type, data=data)
        message: dict[str, Any] = {
            "message_id": self._new_message_id(chat_id),
            "date": int(time.time()),
            "chat": dict(chat),
            "from": dict(user),
        }
        if document is None:
            message["photo"] = self._photo(upload)
        else:  # people may send files up to 2 GB: no upload limit here
            file_id, unique = self._remember(upload)
            message["document"] = {"file_id": file_id, "file_unique_id": unique, "file_name": document,
                                   "mime_type": mime_type, "file_size": len(data)}  # fmt: skip
        if caption is not None:
            message["caption"] = caption
            if caption.startswith("/"):
                length = len(caption.split(maxsplit=1)[0].encode("utf-16-le")) // 2
                message["caption_entities"] = [{"type": "bot_command", "offset": 0, "length": length}]
        if reply_to is not None:
            replied = self.messages.get((chat_id, reply_to))
            if replied is not None and not replied.deleted:
                message["reply_to_message"] = dict(replied.data)
        self.messages[(chat_id, message["message_id"])] = StoredMessage(
            chat_id=chat_id, message_id=message["message_id"], from_bot=False, data=message
        )
        self.inject_update({"message": message})
        return message

    def inject_callback(self, user: Mapping[str, Any], chat_id: int, message_id: int, data: str) -> str:
        """A person presses an inline button with ``data`` under a message; returns the query id."""
        stored = self.messages.get((chat_id, message_id))
        message = (
            dict(stored.data)
            if stored is not None
            else {"message_id": message_id, "date": 0, "chat": self.chats.get(chat_id, {"id": chat_id})}
        )
        query_id = str(next(self._ids) * 1000 + 7)
        self._open_callbacks.add(query_id)
        self.inject_update(
            {
                "callback_query": {
                    "id": query_id,
                    "from": dict(user),
                    "chat_instance": f"ci{chat_id}",
                    "data": data,
                    "message": message,
                }
            }
        )
        return query_id

    def press(self, user: Mapping[str, Any], message: StoredMessage, label: str) -> str:
        """Press the button whose text contains ``label`` under ``message``; returns the query id."""
        for button in message.buttons():
            if label.lower() in str(button.get("text", "")).lower():
                return self.inject_callback(
                    user, message.chat_id, message.message_id, button["callback_data"]
                )
        raise AssertionError(f"no button {label!r} under message {message.message_id}: {message.buttons()}")

    # ------------------------------------------------------------------ looking

    def calls_of(self, method: str, chat_id: int | None = None, *, ok: bool | None = None) -> list[ApiCall]:
        """Recorded calls of ``method`` (to ``chat_id``; only successful or failed ones if ``ok`` is set)."""
        return [
            c
            for c in self.calls
            if c.method == method and (chat_id is None or c.chat_id == chat_id) and (ok is None or c.ok == ok)
        ]

    async def wait_for(
        self,
        method: str,
        where: Callable[[ApiCall], bool] | None = None,
        *,
        count: int = 1,
        timeout: float = 30.0,
    ) -> ApiCall:
        """Wait until ``count`` calls of ``method`` matching ``where`` were answered; returns the last.

        The timeout is a safety net for a broken test, not a way to wait.
        """

        def matching() -> list[ApiCall]:
            return [c for c in self.calls if c.method == method and (where is None or where(c))]

        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: len(matching()) >= count), timeout)
            except TimeoutError:
                seen = ", ".join(f"{c.method}:{c.status}" for c in self.calls if c.method != "getUpdates")
                raise AssertionError(f"no {count} x {method} within {timeout}s; calls: {seen}") from None
            return matching()[count - 1]

    async def wait_until(self, predicate: Callable[[], bool], *, timeout: float = 30.0) -> None:
        """Wait until ``predicate()`` holds; checked after every answered call."""
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(predicate), timeout)
            except TimeoutError:
                raise AssertionError(f"condition not met within {timeout}s") from None

    async def wait_confirmed(self, update_id: int | None = None, *, timeout: float = 30.0) -> None:
        """Wait until the client fetched ``update_id`` (default: the newest) and asked for the next ones.

        python-telegram-bot asks again only after queueing what it fetched, so after this the update
        is in the application's update queue.
        """
        target = self.last_update_id if update_id is None else update_id
        await self.wait_until(lambda: self.confirmed_update_id >= target, timeout=timeout)

    def message(self, chat_id: int, message_id: int) -> StoredMessage:
        """The stored message (KeyError if there is none)."""
        return self.messages[(chat_id, message_id)]

    def bot_messages(self, chat_id: int, *, include_deleted: bool = False) -> list[StoredMessage]:
        """Messages the bot sent to ``chat_id``, oldest first."""
        return [
            m
            for (cid, _), m in sorted(self.messages.items())
            if cid == chat_id and m.from_bot and (include_deleted or not m.deleted)
        ]

    @property
    def last_update_id(self) -> int:
        """The id of the newest injected update (0 before the first)."""
        return self._next_update - 1

    @property
    def pending_updates(self) -> int:
        """Updates not yet confirmed by a later ``getUpdates`` offset."""
        return len(self.updates)

    # ------------------------------------------------------------------ serving

    def _notify_soon(self) -> None:
        async def notify() -> None:
            async with self._cond:
                self._cond.notify_all()

        with contextlib.suppress(RuntimeError):  # no running loop: the next poll sees it anyway
            task = asyncio.get_running_loop().create_task(notify())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read(self, request: web.Request) -> tuple[dict[str, Any], dict[str, Upload]]:
        params: dict[str, Any] = dict(request.query)
        files: dict[str, Upload] = {}
        ctype = request.content_type
        if ctype.startswith("multipart/"):
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader) or part.name is None:
                    continue
                if part.filename is not None:
                    files[part.name] = Upload(
                        field=part.name,
                        filename=part.filename,
                        content_type=part.headers.get("Content-Type", "application/octet-stream"),
                        data=bytes(await part.read()),
                    )
                else:
                    params[part.name] = await part.text()
        elif ctype == "application/json":
            body = await request.json()
            if isinstance(body, dict):
                params.update(body)
        elif request.can_read_body:
            params.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
        return {k: _decode(k, v) for k, v in params.items()}, files

    async def _file(self, request: web.Request) -> web.Response:
        upload = self.files.get(request.match_info["path"])
        if request.match_info["token"] != self.token or upload is None:
            return web.Response(status=404, text="Not Found")
        return web.Response(body=upload.data, content_type=upload.content_type)

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params, files = await self._read(request)
        status, body, counted, limited = 200, None, 0, False
        hold = next((h for h in self._holds if h.matches(method, params)), None)
        if hold is not None:
            hold.params = params  # claimed now: a second matching call is not held
        try:
            if request.match_info["token"] != self.token:
                raise _ApiError(401, "Unauthorized")
            if hold is not None and not hold.applied:
                await hold.wait()
                if hold.dropped:  # lost on the way: Telegram never saw it
                    raise _ApiError(502, "Bad Gateway")
            result, counted = await self._dispatch(method, params, files)
            body = {"ok": True, "result": result}
        except _ApiError as err:
            status, limited = err.status, err.limited
            body = {"ok": False, "error_code": err.status, "description": err.description}
            if err.parameters:
                body["parameters"] = err.parameters
        call = ApiCall(
            seq=len(self.calls) + 1,
            method=method,
            params=params,
            files=files,
            status=status,
            result=body.get("result"),
            description=body.get("description"),
            at=self._clock(),
            parameters=body.get("parameters"),
            counted=counted,
            limited=limited,
        )
        async with self._cond:
            self.calls.append(call)
            if limited:
                self.rate_limited.append(call)
            self._cond.notify_all()
        if hold is not None and hold.applied:
            hold.call = call
            await hold.wait()
            if hold.dropped and request.transport is not None:  # the answer never leaves
                request.transport.abort()
        return web.json_response(body, status=status)

    def _injected(self, method: str, chat_id: int | None) -> None:
        for rule in self._rules:
            if rule.times <= 0:
                continue
            if rule.method != method and not (rule.method == "*" and method != "getUpdates"):
                continue
            if rule.chat_id is not None and rule.chat_id != chat_id:
                continue
            rule.times -= 1
            raise _ApiError(rule.status, rule.description, rule.parameters)

    async def _dispatch(self, method: str, p: dict[str, Any], files: dict[str, Upload]) -> tuple[Any, int]:
        """The method's result and the slots it took; the limit is checked before the method runs."""
        chat_id = p.get("chat_id") if isinstance(p.get("chat_id"), int) else None
        self._injected(method, chat_id)
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            raise _ApiError(404, "Not Found")
        if chat_id is not None and chat_id in self.kicked:
            chat = self.chats.get(chat_id, {})
            raise _ApiError(
                403,
                "Forbidden: bot was blocked by the user"
                if chat.get("type") == "private"
                else "Forbidden: bot was kicked from the group chat",
            )
        weight = self._weight(method, p)
        if weight == 0 or chat_id is None:
            return await handler(p, files), 0
        # check, run and stamp without yielding: no other call can take the slot in between
        # (a counted method's handler never awaits anything)
        now = self._clock()
        limit = self._limit_for(chat_id)
        if limit is not None:
            self._check_limit(chat_id, limit, weight, now)
        result = await handler(p, files)
        if limit is not None:
            self._slots.setdefault(chat_id, deque()).extend([now] * weight)
        return result, weight

    # ------------------------------------------------------------------ flood limits

    def _weight(self, method: str, p: Mapping[str, Any]) -> int:
        """How many slots the call takes: one, one per album item, or none when it is not counted."""
        if method not in self.counted_methods:
            return 0
        media = p.get("media")
        if method == "sendMediaGroup" and isinstance(media, list):
            return max(1, len(media))
        return 1

    def _limit_for(self, chat_id: int) -> Limit | None:
        # groups, supergroups (and channels) have negative ids, private chats the user's id
        return self.group_limit if chat_id < 0 else self.private_limit

    def _check_limit(self, chat_id: int, limit: Limit, weight: int, now: float) -> None:
        stamps = self._slots.setdefault(chat_id, deque())
        while stamps and stamps[0] <= now - limit.window:
            stamps.popleft()
        over = len(stamps) + weight - limit.calls
        if over <= 0:
            return
        # the ``over`` oldest slots must expire first; a call bigger than the limit never fits
        wait = stamps[over - 1] + limit.window - now if over <= len(stamps) else limit.window
        retry_after = max(1, math.ceil(wait))
        raise _ApiError(
            429, f"Too Many Requests: retry after {retry_after}", {"retry_after": retry_after}, limited=True
        )

    def use_slots(self, chat_id: int, n: int) -> None:
        """Take ``n`` slots of the chat's window now, as if the bot had just sent ``n`` messages.

        For a test that starts in a group whose budget is already spent (nothing is recorded).
        """
        self._slots.setdefault(chat_id, deque()).extend([self._clock()] * n)

    def counted(self, chat_id: int) -> int:
        """Slots the bot's successful calls took in ``chat_id`` so far (album items each count)."""
        return sum(c.counted for c in self.calls if c.chat_id == chat_id)

    def counted_calls(self, chat_id: int | None = None) -> list[ApiCall]:
        """The successful calls that took slots (in ``chat_id``), oldest first."""
        return [c for c in self.calls if c.counted and (chat_id is None or c.chat_id == chat_id)]

    def counted_per_chat(self) -> dict[int, int]:
        """Slots taken per chat."""
        out: dict[int, int] = {}
        for call in self.counted_calls():
            assert call.chat_id is not None
            out[call.chat_id] = out.get(call.chat_id, 0) + call.counted
        return out

    def busiest_window(self, chat_id: int, window: float) -> int:
        """The most slots taken in ``chat_id`` within any ``window`` seconds (by answer time)."""
        stamps = sorted(t for c in self.counted_calls(chat_id) for t in [c.at] * c.counted)
        best, first = 0, 0
        for last, at in enumerate(stamps):
            while at - stamps[first] >= window:
                first += 1
            best = max(best, last - first + 1)
        return best

    # ------------------------------------------------------------------ helpers for methods

    def _new_message_id(self, chat_id: int) -> int:
        next_id = self._next_message.get(chat_id, 1)
        self._next_message[chat_id] = next_id + 1
        return next_id

    def _chat(self, p: Mapping[str, Any]) -> dict[str, Any]:
        chat_id = p.get("chat_id")
        if not isinstance(chat_id, int) or chat_id not in self.chats:
            raise _ApiError(400, "Bad Request: chat not found")
        return self.chats[chat_id]

    def _stored(self, p: Mapping[str, Any], missing: str) -> StoredMessage:
        chat = self._chat(p)
        stored = self.messages.get((chat["id"], p.get("message_id", 0)))
        if stored is None or stored.deleted:
            raise _ApiError(400, f"Bad Request: message to {missing} not found")
        return stored

    def _bot_message(self, chat: dict[str, Any], p: Mapping[str, Any], **content: Any) -> dict[str, Any]:
        message: dict[str, Any] = {
            "message_id": self._new_message_id(chat["id"]),
            "date": int(time.time()),
            "chat": dict(chat),
            "from": dict(self.me),
            **content,
        }
        reply = p.get("reply_parameters") or (
            {"message_id": p["reply_to_message_id"]} if "reply_to_message_id" in p else None
        )
        if isinstance(reply, dict) and reply.get("message_id"):
            replied = self.messages.get((chat["id"], int(reply["message_id"])))
            if replied is not None and not replied.deleted:
                message["reply_to_message"] = dict(replied.data)
            elif not reply.get("allow_sending_without_reply"):
                raise _ApiError(400, "Bad Request: message to be replied not found")
        markup = _markup(p.get("reply_markup"))
        if markup is not None:
            message["reply_markup"] = markup
        if isinstance(p.get("message_thread_id"), int):
            message["message_thread_id"] = p["message_thread_id"]
        return message

    def _keep(self, message: dict[str, Any]) -> dict[str, Any]:
        self.messages[(message["chat"]["id"], message["message_id"])] = StoredMessage(
            chat_id=message["chat"]["id"], message_id=message["message_id"], from_bot=True, data=message
        )
        return message

    def _file_for(
        self, p: Mapping[str, Any], files: Mapping[str, Upload], name: str, value: Any = None
    ) -> Upload:
        ref = p.get(name) if value is None else value
        if isinstance(ref, str) and ref.startswith("attach://"):
            ref = ref[9:]
            upload = files.get(ref)
        elif isinstance(ref, str) and ref in self.files:
            upload = self.files[ref]
        else:
            upload = files.get(name)
        if upload is None:
            raise _ApiError(400, f"Bad Request: there is no {name} in the request")
        return upload

    def _remember(self, upload: Upload) -> tuple[str, str]:
        n = next(self._ids)
        file_id, unique = f"F{n:06d}", f"U{n:06d}"
        self.files[file_id] = upload
        return file_id, unique

    def _photo(self, upload: Upload) -> list[dict[str, Any]]:
        if len(upload.data) > self.photo_limit:
            raise _ApiError(400, "Bad Request: PHOTO_SAVE_FILE_INVALID")
        width, height = _image_size(upload.data)
        file_id, unique = self._remember(upload)
        return [
            {"file_id": f"{file_id}s", "file_unique_id": f"{unique}s", "width": 90, "height": 90},
            {
                "file_id": file_id,
                "file_unique_id": unique,
                "width": width or 1,
                "height": height or 1,
                "file_size": len(upload.data),
            },
        ]

    def _document(self, upload: Upload) -> dict[str, Any]:
        if len(upload.data) > self.document_limit:
            raise _ApiError(413, "Request Entity Too Large")
        file_id, unique = self._remember(upload)
        return {
            "file_id": file_id,
            "file_unique_id": unique,
            "file_name": upload.filename,
            "mime_type": upload.content_type,
            "file_size": len(upload.data),
        }

    # ------------------------------------------------------------------ methods

    async def _m_getMe(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        return self.me

    async def _m_logOut(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        return True

    async def _m_close(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        return True

    async def _m_deleteWebhook(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        if p.get("drop_pending_updates"):
            self.updates.clear()
        return True

    async def _m_setWebhook(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        return True

    async def _m_getWebhookInfo(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        return {"url": "", "has_custom_certificate": False, "pending_update_count": len(self.updates)}

    async def _m_getUpdates(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        offset = int(p.get("offset") or 0)
        limit = int(p.get("limit") or 100)
        timeout = min(float(p.get("timeout") or 0), 60.0)
        if offset > 0:  # confirms every update before it
            self.updates = [u for u in self.updates if u["update_id"] >= offset]
            if offset - 1 > self.confirmed_update_id:
                self.confirmed_update_id = offset - 1
                async with self._cond:
                    self._cond.notify_all()

        def ready() -> list[dict[str, Any]]:
            return [u for u in self.updates if u["update_id"] >= offset][:limit]

        if not ready() and timeout > 0 and not self._closing:
            async with self._cond:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._cond.wait_for(lambda: bool(ready()) or self._closing), timeout
                    )
        return [] if self._closing else ready()

    async def _m_setMyCommands(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        commands = p.get("commands")
        if not isinstance(commands, list) or not commands:
            raise _ApiError(400, "Bad Request: commands must be a non-empty list")
        for command in commands:
            if not re.fullmatch(r"[a-z0-9_]{1,32}", str(command.get("command", ""))):
                raise _ApiError(400, "Bad Request: BOT_COMMAND_INVALID")
            if not 1 <= len(str(command.get("description", ""))) <= 256:
                raise _ApiError(400, "Bad Request: BOT_COMMAND_DESCRIPTION_INVALID")
        scope = json.dumps(p.get("scope") or {"type": "default"}, sort_keys=True)
        self.commands[scope] = commands
        return True

    async def _m_getMyCommands(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        return self.commands.get(json.dumps(p.get("scope") or {"type": "default"}, sort_keys=True), [])

    async def _m_deleteMyCommands(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        self.commands.pop(json.dumps(p.get("scope") or {"type": "default"}, sort_keys=True), None)
        return True

    async def _m_getChat(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        return {**self._chat(p), "accent_color_id": 0, "max_reaction_count": 11}

    async def _m_getFile(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        file_id = str(p.get("file_id", ""))
        upload = self.files.get(file_id)
        if upload is None:
            raise _ApiError(400, "Bad Request: invalid file_id")
        if len(upload.data) > 20 * 1024 * 1024:  # the Bot API serves files up to 20 MB
            raise _ApiError(400, "Bad Request: file is too big")
        return {"file_id": file_id, "file_unique_id": f"U{file_id}", "file_size": len(upload.data),
                "file_path": file_id}  # fmt: skip

    async def _m_sendChatAction(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        self._chat(p)
        return True

    async def _m_sendMessage(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        chat = self._chat(p)
        text = str(p.get("text", ""))
        if not text.strip():
            raise _ApiError(400, "Bad Request: message text is empty")
        if len(text) > 4096:
            raise _ApiError(400, "Bad Request: message is too long")
        return self._keep(self._bot_message(chat, p, text=text))

    def _check_caption(self, p: Mapping[str, Any]) -> dict[str, Any]:
        caption = p.get("caption")
        if caption is None:
            return {}
        if len(str(caption)) > 1024:
            raise _ApiError(400, "Bad Request: message caption is too long")
        return {"caption": str(caption)}

    async def _m_sendPhoto(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        chat = self._chat(p)
        photo = self._photo(self._file_for(p, files, "photo"))
        return self._keep(self._bot_message(chat, p, photo=photo, **self._check_caption(p)))

    async def _m_sendDocument(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        chat = self._chat(p)
        document = self._document(self._file_for(p, files, "document"))
        return self._keep(self._bot_message(chat, p, document=document, **self._check_caption(p)))

    async def _m_sendMediaGroup(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        chat = self._chat(p)
        media = p.get("media")
        if not isinstance(media, list) or not 2 <= len(media) <= 10:
            raise _ApiError(400, "Bad Request: wrong number of messages in the media group (2-10)")
        kinds = {item.get("type") for item in media}
        if "document" in kinds and kinds != {"document"}:
            raise _ApiError(400, "Bad Request: documents can't be mixed with other media types")
        group_id = str(10**12 + next(self._ids))
        contents = []
        for item in media:
            upload = self._file_for(p, files, str(item.get("type")), item.get("media"))
            content: dict[str, Any] = {"media_group_id": group_id, **self._check_caption(item)}
            if item.get("type") == "photo":
                content["photo"] = self._photo(upload)
            elif item.get("type") == "document":
                content["document"] = self._document(upload)
            else:
                raise _ApiError(400, f"Bad Request: unsupported media type {item.get('type')}")
            contents.append(content)
        first = self._bot_message(chat, p, **contents[0])
        messages = [first] + [
            self._bot_message(chat, {k: v for k, v in p.items() if k != "reply_parameters"}, **c)
            for c in contents[1:]
        ]
        for message in messages:
            if "reply_to_message" in first:
                message["reply_to_message"] = first["reply_to_message"]
            self._keep(message)
        return messages

    async def _m_editMessageText(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        stored = self._stored(p, "edit")
        if stored.text is None:
            raise _ApiError(400, "Bad Request: there is no text in the message to edit")
        text = str(p.get("text", ""))
        if not text.strip():
            raise _ApiError(400, "Bad Request: message text is empty")
        markup = _markup(p.get("reply_markup"))
        if text == stored.text and markup == stored.reply_markup:
            raise _ApiError(400, _NOT_MODIFIED)
        stored.data = {k: v for k, v in stored.data.items() if k != "reply_markup"}
        stored.data.update(text=text, edit_date=int(time.time()))
        if markup is not None:
            stored.data["reply_markup"] = markup
        return stored.data

    async def _m_editMessageCaption(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        stored = self._stored(p, "edit")
        if stored.text is not None:
            raise _ApiError(400, "Bad Request: there is no caption in the message to edit")
        caption = self._check_caption(p).get("caption", "")
        markup = _markup(p.get("reply_markup"))
        if caption == (stored.caption or "") and markup == stored.reply_markup:
            raise _ApiError(400, _NOT_MODIFIED)
        stored.data = {k: v for k, v in stored.data.items() if k not in ("reply_markup", "caption")}
        stored.data["edit_date"] = int(time.time())
        if caption:
            stored.data["caption"] = caption
        if markup is not None:
            stored.data["reply_markup"] = markup
        return stored.data

    async def _m_editMessageReplyMarkup(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        stored = self._stored(p, "edit")
        markup = _markup(p.get("reply_markup"))
        if markup == stored.reply_markup:
            raise _ApiError(400, _NOT_MODIFIED)
        stored.data = {k: v for k, v in stored.data.items() if k != "reply_markup"}
        if markup is not None:
            stored.data["reply_markup"] = markup
        return stored.data

    async def _m_editMessageMedia(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        stored = self._stored(p, "edit")
        media = p.get("media")
        if not isinstance(media, dict) or media.get("type") not in ("photo", "document"):
            raise _ApiError(400, "Bad Request: can't parse InputMedia")
        if stored.text is not None:
            raise _ApiError(400, "Bad Request: there is no media in the message to edit")
        upload = self._file_for(p, files, str(media["type"]), media.get("media"))
        kept = {
            k: v for k, v in stored.data.items() if k not in ("photo", "document", "caption", "reply_markup")
        }
        if media["type"] == "photo":
            kept["photo"] = self._photo(upload)
        else:
            kept["document"] = self._document(upload)
        kept.update(self._check_caption(media), edit_date=int(time.time()))
        markup = _markup(p.get("reply_markup"))
        if markup is not None:
            kept["reply_markup"] = markup
        stored.data = kept
        return stored.data

    async def _m_setMessageReaction(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        stored = self._stored(p, "react")
        reaction = p.get("reaction") or []
        if not isinstance(reaction, list) or any(not isinstance(r, dict) for r in reaction):
            raise _ApiError(400, "Bad Request: REACTION_INVALID")
        stored.reaction = reaction
        return True

    async def _m_deleteMessage(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        self._stored(p, "delete").deleted = True
        return True

    async def _m_deleteMessages(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        chat = self._chat(p)
        ids = p.get("message_ids")
        if not isinstance(ids, list) or not 1 <= len(ids) <= 100:
            raise _ApiError(400, "Bad Request: message_ids must list 1-100 message ids")
        found = [self.messages.get((chat["id"], int(i))) for i in ids]
        alive = [m for m in found if m is not None and not m.deleted]
        if not alive:
            raise _ApiError(400, "Bad Request: message to delete not found")
        for stored in alive:
            stored.deleted = True
        return True

    async def _m_answerCallbackQuery(self, p: dict[str, Any], files: dict[str, Upload]) -> Any:
        query_id = str(p.get("callback_query_id", ""))
        if query_id not in self._open_callbacks:
            raise _ApiError(
                400, "Bad Request: query is too old and response timeout expired or query ID is invalid"
            )
        self._open_callbacks.discard(query_id)
        if len(str(p.get("text", ""))) > 200:
            raise _ApiError(400, "Bad Request: MESSAGE_TOO_LONG")
        return True

    # the answer to a callback query, for tests
    def answer(self, query_id: str) -> ApiCall | None:
        """The successful ``answerCallbackQuery`` call for ``query_id``, if any."""
        for call in self.calls_of("answerCallbackQuery", ok=True):
            if str(call.params.get("callback_query_id")) == query_id:
                return call
        return None


__all__ = [
    "COUNTED_METHODS",
    "DEFAULT_TOKEN",
    "DELETE_METHODS",
    "GROUP_LIMIT",
    "PRIVATE_LIMIT",
    "ApiCall",
    "FakeTelegram",
    "Limit",
    "StoredMessage",
    "Upload",
]

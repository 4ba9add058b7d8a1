"""The Telegram adapter: ``/draw`` and friends through python-telegram-bot 22, status edits, photos, buttons."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from telegram import (
    BotCommand,
    BotCommandScopeChat,
    BotCommandScopeDefault,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputMediaDocument,
    InputMediaPhoto,
    MaybeInaccessibleMessage,
    Message,
    MessageEntity,
    ReplyParameters,
    Update,
)
from telegram.constants import ChatAction, ChatType
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
    TimedOut,
)
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationHandlerStop,
    BaseRateLimiter,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    TypeHandler,
    filters,
)
from telegram.request import HTTPXRequest

from bot import messages
from bot.config import Settings
from bot.domain import Job, JobState, Progress, SavedImage, Ticket, UserRef
from bot.errors import (
    BotError,
    ConfigError,
    DeliveryError,
    NoCreditsError,
    NotFoundError,
    RequestError,
    UnreachableError,
)
from bot.grammar import split_flags
from bot.logs import guard_logs
from bot.ports import Reply
from bot.service import Service

_log = logging.getLogger(__name__)

PLATFORM = "telegram"
#: Bot API upload limits: photos are recompressed by Telegram, documents are kept byte for byte
PHOTO_LIMIT = 10 * 1024 * 1024
DOCUMENT_LIMIT = 50 * 1024 * 1024
CAPTION_LIMIT = 1024
#: callback data is ``bb:<action>:<job id>``, far below Telegram's 64 bytes
CALLBACK_PREFIX = "bb"
_ACTIONS = ("reroll", "png", "del", "cancel")

PUBLIC_COMMANDS: tuple[tuple[str, str], ...] = (
    ("draw", "Draw a picture: /draw a red fox in snow --ar 16:9"),
    ("credits", "Your credits and when they refill"),
    ("jobs", "Your queued, running and recent jobs"),
    ("queue", "Who is waiting for the GPU"),
    ("cancel", "Cancel a job: /cancel [job id]"),
    ("help", "How to draw, flags and credits"),
)
ADMIN_COMMANDS: tuple[tuple[str, str], ...] = (
    ("quota", "Admin: /quota show|set|grant|reset <user> [credits]"),
    ("ban", "Admin: /ban <user>"),
    ("unban", "Admin: /unban <user>"),
    ("weight", "Admin: /weight <user> <weight>"),
    ("stats", "Admin: jobs, queue and speed"),
)
ADMIN_HELP = """Admin commands (a user is a numeric id, an @username the bot has seen, or a replied-to message):
/quota show <user>    /quota set <user> <credits|default>    /quota grant <user> <credits>
/quota reset <user>    /ban <user>    /unban <user>    /weight <user> <weight>    /stats"""
GENERIC_ERROR = "Something went wrong on our side; the operator can find the details in the log."

#: top-level logger names whose records get the token redacted at the source
_REDACTED_LOGGERS = ("telegram", "httpx", "httpcore", "adapters", "bot", "data", "generation", "asyncio")

_T = TypeVar("_T")
_Context = ContextTypes.DEFAULT_TYPE
_NUMERIC_ID = re.compile(r"\d{1,20}")
_USERNAME = re.compile(r"@?[A-Za-z][A-Za-z0-9_]{2,31}")
# Bad requests that mean "this photo cannot be a photo" (too big, odd dimensions): send a document
_PHOTO_REJECTED = (
    "photo",
    "image_process_failed",
    "too big",
    "dimensions",
    "entity too large",
    "file is too",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Webhook:
    """Webhook mode: Telegram POSTs updates to ``url``; PTB listens on ``listen:port/path``.

    Needs ``python-telegram-bot[webhooks]`` (tornado). Without a ``Webhook`` the adapter long-polls.
    """

    url: str
    listen: str = "127.0.0.1"
    port: int = 8443
    path: str = "telegram"
    secret_token: str | None = None


def _api_url(base: str | None, suffix: str) -> str | None:
    """``http://host:8081`` → ``http://host:8081/bot`` (PTB appends the token)."""
    if not base:
        return None
    base = base.rstrip("/")
    if "{token}" in base or base.endswith(suffix):
        return base
    return base + suffix


def _sentence(text: str) -> str:
    """One line for the chat, starting with a capital letter."""
    line = " ".join(text.split())
    return line[:1].upper() + line[1:]


def user_ref(user: Any) -> UserRef:
    """The core's reference to a Telegram user."""
    return UserRef(platform=PLATFORM, id=str(user.id))


def display_name(user: Any) -> str:
    """The name stored for a user: the username without ``@`` (so ``/quota show @name`` finds it
    and listings do not ping anyone), else the full name."""
    return str(user.username) if user.username else str(user.full_name)


def callback_data(action: str, job_id: str) -> str:
    """Button payload carrying the job id; everything else is read from the database."""
    data = f"{CALLBACK_PREFIX}:{action}:{job_id}"
    if len(data.encode()) > 64:
        raise ValueError("callback data over 64 bytes")
    return data


def parse_callback(data: str | None) -> tuple[str, str] | None:
    """``(action, job id)`` from button data, or None when it is not ours."""
    parts = (data or "").split(":")
    if len(parts) != 3 or parts[0] != CALLBACK_PREFIX or parts[1] not in _ACTIONS or not parts[2]:
        return None
    return parts[1], parts[2]


def cancel_markup(job_id: str) -> InlineKeyboardMarkup:
    """The status message's keyboard while a job is queued or running."""
    return InlineKeyboardMarkup(
        [[InlineKeyboardButton("✖ Cancel", callback_data=callback_data("cancel", job_id))]]
    )


def result_markup(job_id: str) -> InlineKeyboardMarkup:
    """The keyboard under a delivered result."""
    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton("🎲 Reroll", callback_data=callback_data("reroll", job_id)),
                InlineKeyboardButton("🖼 Original PNG", callback_data=callback_data("png", job_id)),
                InlineKeyboardButton("🗑 Delete", callback_data=callback_data("del", job_id)),
            ]
        ]
    )


def _command_text(message: Message) -> str:
    """The raw text after the leading ``/command[@bot]`` (flags and spacing kept)."""
    text = message.text or ""
    entity = message.entities[0] if message.entities else None
    if entity is None or entity.type != MessageEntity.BOT_COMMAND or entity.offset != 0:
        return text
    # entity offsets count UTF-16 units; the command itself is ASCII, so this is exact
    return text[entity.length :].strip()


def _replied_prompt(message: Message, bot_id: int) -> str:
    """The prompt a ``/draw`` reply borrows: the replied message's text or caption."""
    replied = message.reply_to_message
    if replied is None:
        return ""
    text = (replied.text or replied.caption or "").strip()
    if replied.from_user is not None and replied.from_user.id == bot_id:
        text = text.splitlines()[0] if text else ""  # our caption: the prompt is the first line
    if text.startswith("/"):
        first, _, rest = text.partition(" ")
        text = rest.strip() if first.split("@")[0].lower() == "/draw" else text
    return text


def _delivery(message: MaybeInaccessibleMessage) -> dict[str, Any]:
    """The JSON-able chat reference a job carries, enough to reply after a restart.

    A button's message may be too old for Telegram to include (inaccessible): then the job
    goes to the chat without a topic.
    """
    chat = message.chat
    delivery: dict[str, Any] = {
        "chat_id": chat.id,
        "chat_type": str(chat.type),
        "message_id": message.message_id,
    }
    if isinstance(message, Message) and message.is_topic_message and message.message_thread_id is not None:
        delivery["thread_id"] = message.message_thread_id
    return delivery


def _core_error(err: TelegramError) -> DeliveryError:
    """A Telegram failure as a core delivery error: unreachable ones are not retried."""
    if isinstance(err, Forbidden):
        return UnreachableError("the bot was removed from this chat or blocked")
    if isinstance(err, BadRequest):
        return UnreachableError(f"Telegram refused the message ({err.message})")
    if isinstance(err, RetryAfter):
        return DeliveryError("Telegram asked the bot to slow down")
    if isinstance(err, TimedOut):
        return DeliveryError("Telegram did not answer in time")
    return DeliveryError(f"Telegram error ({err.message})")


def _photo_rejected(err: TelegramError) -> bool:
    return (
        isinstance(err, NetworkError)
        and not isinstance(err, TimedOut)
        and (any(s in err.message.lower() for s in _PHOTO_REJECTED))
    )


class TelegramReply:
    """The ``Reply`` port for one job in one chat, rebuilt from ``job.delivery`` alone.

    One status message (sent when queued, edited for progress, then removed or turned into the
    result's keyboard) plus the result keeps each job to as few messages as groups allow.
    """

    def __init__(self, adapter: TelegramAdapter, job: Job) -> None:
        self._adapter = adapter
        self._job_id = job.id
        delivery = job.delivery
        chat_id = delivery.get("chat_id")
        self._chat_id: int | None = (
            int(chat_id) if isinstance(chat_id, int | str) and str(chat_id).lstrip("-").isdigit() else None
        )
        self._private = delivery.get("chat_type") == ChatType.PRIVATE
        self._reply_to: int | None = delivery.get("message_id")
        self._thread: int | None = delivery.get("thread_id")
        self._status: int | None = delivery.get("status_message_id")
        self._last_text: str | None = None
        self._last_edit = 0.0
        # Progress edits stop once the result or failure is on its way, and the lock keeps an
        # in-flight progress edit from landing after the status became the result's keyboard.
        self._finished = False
        self._status_lock = asyncio.Lock()

    # ------------------------------------------------------------------ plumbing

    async def _api(self, call: Callable[..., Awaitable[_T]], **kwargs: Any) -> _T:
        """Call a Bot API method in this chat, following a group's migration to a supergroup once."""
        if self._chat_id is None:
            raise UnreachableError("the job has no Telegram chat to reply to")
        if self._adapter.closed:
            raise DeliveryError("the Telegram adapter is stopping")
        try:
            return await call(chat_id=self._chat_id, **kwargs)
        except ChatMigrated as err:
            self._chat_id = int(err.new_chat_id)
            await self._adapter.service.update_delivery(self._job_id, chat_id=self._chat_id)
            return await call(chat_id=self._chat_id, **kwargs)

    def _where(self) -> dict[str, Any]:
        where: dict[str, Any] = {}
        if self._reply_to is not None:
            where["reply_parameters"] = ReplyParameters(
                message_id=self._reply_to, allow_sending_without_reply=True
            )
        if self._thread is not None:
            where["message_thread_id"] = self._thread
        return where

    async def _edit_status(self, text: str, markup: InlineKeyboardMarkup | None) -> bool:
        """Edit the status message; False when there is none (any more)."""
        if self._status is None:
            return False
        bot = self._adapter.bot
        self._last_edit = time.monotonic()
        try:
            await self._api(bot.edit_message_text, message_id=self._status, text=text, reply_markup=markup)
        except BadRequest as err:
            lowered = err.message.lower()
            if "not modified" in lowered:
                self._last_text = text
                return True
            if "not found" in lowered or "can't be edited" in lowered:
                self._status = None  # deleted by someone: stop editing it
                return False
            raise _core_error(err) from None
        except TelegramError as err:
            raise _core_error(err) from None
        self._last_text = text
        return True

    async def _delete_status(self) -> None:
        if self._status is None:
            return
        status, self._status = self._status, None
        try:
            await self._api(self._adapter.bot.delete_message, message_id=status)
        except (TelegramError, BotError) as err:
            _log.debug("job %s: status message not deleted: %s", self._job_id, err)

    # ------------------------------------------------------------------ the Reply port

    async def queued(self, job: Job, ticket: Ticket) -> None:
        """Post the status (position, ETA, cost, credits left) with a Cancel button."""
        text = messages.ticket_text(ticket)
        markup = cancel_markup(job.id)
        if self._status is not None:  # re-queued after a restart: reuse the message
            if await self._edit_status(f"{text}\nResumed after a restart.", markup):
                return
        bot = self._adapter.bot
        try:
            sent = await self._api(bot.send_message, text=text, reply_markup=markup, **self._where())
        except TelegramError as err:
            raise _core_error(err) from None
        self._status = sent.message_id
        self._last_text, self._last_edit = text, time.monotonic()
        await self._adapter.service.update_delivery(job.id, status_message_id=sent.message_id)

    async def progress(self, job: Job, progress: Progress) -> None:
        """Edit the status with a progress bar: throttled per chat type, never unchanged text."""
        if self._status is None or self._finished:
            return
        if time.monotonic() - self._last_edit < self._adapter.progress_interval(self._private):
            return
        text = messages.progress_text(job, progress)
        if text == self._last_text:
            return
        async with self._status_lock:
            if not self._finished:
                await self._edit_status(text, cancel_markup(job.id))

    async def delivered(self, job: Job, images: Sequence[SavedImage]) -> None:
        """Send the photo (or an album) with caption and buttons; documents when a photo is refused."""
        if not images:
            raise DeliveryError("there is nothing to deliver")
        self._finished = True
        seconds = messages.job_seconds(job, time.time())
        caption = messages.caption(job, seconds, limit=CAPTION_LIMIT)
        adapter = self._adapter
        if self._private:
            await self._chat_action()
        try:
            if len(images) == 1:
                sent = [await self._send_single(job, images[0], caption)]
            else:
                sent = await self._send_album(images, caption)
        except TelegramError as err:
            raise _core_error(err) from None
        # Delivered: from here on nothing may raise, or the service would send it all again.
        ids = [m.message_id for m in sent]
        try:
            async with self._status_lock:
                if len(images) == 1:
                    await self._delete_status()
                else:
                    ids.append(await self._album_keyboard(job, sent[0], len(images)))
            await adapter.service.update_delivery(job.id, result_message_ids=ids)
        except Exception:
            _log.exception("job %s: delivered, but the follow-up failed", job.id)

    async def failed(self, job: Job, message: str) -> None:
        """Turn the status into the failure line (buttons removed), or post it."""
        text = f"Job {job.id}: {message}"
        self._finished = True
        async with self._status_lock:
            if await self._edit_status(text, None):
                return
        try:
            await self._api(self._adapter.bot.send_message, text=text, **self._where())
        except TelegramError as err:
            raise _core_error(err) from None

    # ------------------------------------------------------------------ results

    async def _chat_action(self) -> None:
        try:
            await self._api(self._adapter.bot.send_chat_action, action=ChatAction.UPLOAD_PHOTO)
        except (TelegramError, BotError) as err:
            _log.debug("job %s: no chat action: %s", self._job_id, err)

    async def _send_single(self, job: Job, image: SavedImage, caption: str) -> Message:
        adapter, bot = self._adapter, self._adapter.bot
        markup = result_markup(job.id)
        if image.size_bytes <= adapter.photo_limit:
            photo = await adapter.service.upload_file(image.path, adapter.photo_limit)
            try:
                return await self._api(
                    bot.send_photo,
                    photo=photo.data,
                    filename=photo.filename,
                    caption=caption,
                    reply_markup=markup,
                    **self._where(),
                )
            except NetworkError as err:
                if not _photo_rejected(err):
                    raise
                _log.info("job %s: Telegram refused the photo (%s); sending a document", job.id, err.message)
        document = await adapter.service.upload_file(image.path, adapter.document_limit)
        return await self._api(
            bot.send_document,
            document=document.data,
            filename=document.filename,
            caption=caption,
            reply_markup=markup,
            **self._where(),
        )

    async def _send_album(self, images: Sequence[SavedImage], caption: str) -> list[Message]:
        adapter, bot = self._adapter, self._adapter.bot
        as_photos = all(image.size_bytes <= adapter.photo_limit for image in images)
        if as_photos:
            files = [await adapter.service.upload_file(i.path, adapter.photo_limit) for i in images]
            media: list[Any] = [
                InputMediaPhoto(f.data, caption=caption if n == 0 else None, filename=f.filename)
                for n, f in enumerate(files)
            ]
            try:
                return list(await self._api(bot.send_media_group, media=media, **self._where()))
            except NetworkError as err:
                if not _photo_rejected(err):
                    raise
                _log.info(
                    "job %s: Telegram refused the photos (%s); sending documents", self._job_id, err.message
                )
        files = [await adapter.service.upload_file(i.path, adapter.document_limit) for i in images]
        media = [
            InputMediaDocument(f.data, caption=caption if n == len(files) - 1 else None, filename=f.filename)
            for n, f in enumerate(files)
        ]
        return list(await self._api(bot.send_media_group, media=media, **self._where()))

    async def _album_keyboard(self, job: Job, first: Message, count: int) -> int:
        """An album cannot carry buttons: the status message becomes the keyboard (or a new one)."""
        text = f"Job {job.id}: {count} images for {job.user_name or 'you'}"
        markup = result_markup(job.id)
        if await self._edit_status(text, markup):
            assert self._status is not None
            return self._status
        sent = await self._api(
            self._adapter.bot.send_message,
            text=text,
            reply_markup=markup,
            reply_parameters=ReplyParameters(message_id=first.message_id, allow_sending_without_reply=True),
        )
        return sent.message_id


class TelegramAdapter:
    """Runs the Telegram bot: commands in, the service's jobs out. An async context manager.

    ``group_progress_interval``/``private_progress_interval`` throttle status edits (groups
    share a budget of about 20 messages a minute); ``rate_limiter`` defaults to PTB's
    ``AIORateLimiter``, which also honours ``RetryAfter``.
    """

    def __init__(
        self,
        service: Service,
        settings: Settings,
        *,
        group_progress_interval: float = 3.0,
        private_progress_interval: float = 1.0,
        rate_limiter: BaseRateLimiter[Any] | None = None,
        poll_timeout: float = 30.0,
        webhook: Webhook | None = None,
        photo_limit: int = PHOTO_LIMIT,
        document_limit: int = DOCUMENT_LIMIT,
    ) -> None:
        self.service = service
        self.settings = settings
        self.group_progress_interval = group_progress_interval
        self.private_progress_interval = private_progress_interval
        self.photo_limit = photo_limit
        self.document_limit = document_limit
        self._rate_limiter = rate_limiter
        self._poll_timeout = poll_timeout
        self._webhook = webhook
        self._app: Application[Any, Any, Any, Any, Any, Any] | None = None
        self._requests: tuple[HTTPXRequest, HTTPXRequest] | None = None
        self._unguard: Callable[[], None] | None = None
        self._levels: dict[str, int] = {}
        self.closed = False

    def __repr__(self) -> str:
        return f"TelegramAdapter(running={self._app is not None and not self.closed})"

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> TelegramAdapter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def app(self) -> Application[Any, Any, Any, Any, Any, Any]:
        if self._app is None:
            raise RuntimeError("the Telegram adapter is not started")
        return self._app

    @property
    def bot(self) -> Any:
        return self.app.bot

    def progress_interval(self, private: bool) -> float:
        return self.private_progress_interval if private else self.group_progress_interval

    async def start(self) -> None:
        """Connect (getMe), register with the service and the command menu, then poll (or webhook)."""
        secret = self.settings.telegram_token
        token = secret.get_secret_value().strip() if secret is not None else ""
        if not token:
            raise ConfigError("TELEGRAM_TOKEN is not set")
        self._guard_logs(token)
        app = self._build(token)
        try:
            await app.initialize()
        except InvalidToken:
            await self._shutdown_requests()
            self._restore_logs()
            raise ConfigError("Telegram rejected TELEGRAM_TOKEN: copy it again from @BotFather") from None
        except TelegramError as err:
            await self._shutdown_requests()
            self._restore_logs()
            message = err.message.replace(token, "[redacted]")
            raise ConfigError(f"cannot reach the Telegram Bot API: {message}") from None
        self._app = app
        self.closed = False
        try:
            self._add_handlers(app)
            self.service.register(PLATFORM, self._reply_for)
            await self._register_commands()
            await app.start()
            await self._receive(app)
        except BaseException:
            await self.close()
            raise
        _log.info(
            "Telegram bot @%s is running (%s)",
            app.bot.username,
            "webhook" if self._webhook else "long polling",
        )

    async def _receive(self, app: Application[Any, Any, Any, Any, Any, Any]) -> None:
        """Start getting updates: long polling, or a webhook when one is configured."""
        updater = app.updater
        assert updater is not None
        allowed = [Update.MESSAGE, Update.CALLBACK_QUERY]
        if self._webhook is None:
            await updater.start_polling(
                timeout=dt.timedelta(seconds=self._poll_timeout), allowed_updates=allowed
            )
            return
        hook = self._webhook
        try:
            await updater.start_webhook(
                listen=hook.listen,
                port=hook.port,
                url_path=hook.path,
                webhook_url=hook.url,
                secret_token=hook.secret_token,
                allowed_updates=allowed,
            )
        except RuntimeError as err:  # PTB without its "webhooks" extra
            raise ConfigError(f"webhook mode is not available: {err}") from None

    async def close(self) -> None:
        """Stop polling and handlers, close the HTTP clients; unfinished jobs stay in the store."""
        self.closed = True
        app = self._app
        try:
            if app is not None:
                if app.updater is not None and app.updater.running:
                    await app.updater.stop()
                if app.running:
                    await app.stop()
                await app.shutdown()
        finally:
            self._restore_logs()

    def _build(self, token: str) -> Application[Any, Any, Any, Any, Any, Any]:
        # Bodies go to Telegram, answers are small: a generous write timeout covers 10 MB photos.
        request = HTTPXRequest(
            connection_pool_size=64, read_timeout=20.0, write_timeout=30.0, media_write_timeout=120.0
        )
        updates = HTTPXRequest(connection_pool_size=2, read_timeout=10.0)
        self._requests = (request, updates)
        builder = (
            Application.builder()
            .token(token)
            .request(request)
            .get_updates_request(updates)
            .rate_limiter(self._rate_limiter or AIORateLimiter(max_retries=5))
            .concurrent_updates(32)
            .job_queue(None)
        )
        base_url = _api_url(self.settings.telegram_base_url, "/bot")
        if base_url:
            builder = builder.base_url(base_url)
        file_url = _api_url(self.settings.telegram_base_file_url, "/file/bot")
        if file_url:
            builder = builder.base_file_url(file_url)
        return builder.build()

    async def _shutdown_requests(self) -> None:
        for request in self._requests or ():
            await request.shutdown()

    def _guard_logs(self, token: str) -> None:
        """Keep the token out of every log line: request URLs contain it (``/bot<TOKEN>/method``).

        The HTTP clients' request logs are silenced below WARNING, and a redacting filter goes on
        the root handlers (lines from anywhere) and on the loggers of the libraries and packages
        that could see the token (their lines, whatever handler is added later).
        """
        self._restore_logs()
        for name in ("httpx", "httpcore"):
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            if logger.getEffectiveLevel() < logging.WARNING:
                logger.setLevel(logging.WARNING)
        self._unguard = guard_logs([token], loggers=_REDACTED_LOGGERS)

    def _restore_logs(self) -> None:
        if self._unguard is not None:
            self._unguard()
            self._unguard = None
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        self._levels.clear()

    def _reply_for(self, job: Job) -> Reply:
        return TelegramReply(self, job)

    def _add_handlers(self, app: Application[Any, Any, Any, Any, Any, Any]) -> None:
        app.add_handler(TypeHandler(Update, self._gate), group=-1)
        fresh = filters.UpdateType.MESSAGE  # not edited messages: editing a /draw must not draw again
        commands: dict[str, Callable[[Update, _Context], Coroutine[Any, Any, None]]] = {
            "draw": self._draw,
            "credits": self._credits,
            "jobs": self._jobs,
            "queue": self._queue,
            "cancel": self._cancel,
            "help": self._help,
            "start": self._start,
            "quota": self._quota,
            "ban": self._ban,
            "unban": self._unban,
            "weight": self._weight,
            "stats": self._stats,
        }
        for name, callback in commands.items():
            app.add_handler(CommandHandler(name, callback, filters=fresh))
        app.add_handler(CallbackQueryHandler(self._button, pattern=rf"^{CALLBACK_PREFIX}:"))
        app.add_error_handler(self._on_error)

    async def _register_commands(self) -> None:
        bot = self.bot
        public = [BotCommand(name, text) for name, text in PUBLIC_COMMANDS]
        try:
            await bot.set_my_commands(public, scope=BotCommandScopeDefault())
        except TelegramError as err:
            _log.warning("could not register the Telegram command list: %s", err)
        # Admins see the admin commands in their private chat with the bot.
        admin_commands = public + [BotCommand(name, text) for name, text in ADMIN_COMMANDS]
        for key in sorted(self.settings.admins):
            platform, _, ident = key.partition(":")
            if platform != PLATFORM or not _NUMERIC_ID.fullmatch(ident):
                continue
            try:
                await bot.set_my_commands(admin_commands, scope=BotCommandScopeChat(int(ident)))
            except TelegramError as err:  # "chat not found" until the admin has started the bot
                _log.info("admin command list not set for %s: %s", key, err)

    # ------------------------------------------------------------------ input

    def _ours(self, message: Message | None) -> bool:
        """Whether the message is a command for this bot (not ``/draw@otherbot``)."""
        if message is None or not message.text or not message.entities:
            return False
        entity = message.entities[0]
        if entity.type != MessageEntity.BOT_COMMAND or entity.offset != 0:
            return False
        _, _, target = message.text[1 : entity.length].partition("@")
        return not target or target.lower() == str(self.bot.username).lower()

    async def _gate(self, update: Update, context: _Context) -> None:
        """Runs first: drops chats outside ``TELEGRAM_ALLOWED_CHATS`` and remembers who wrote."""
        user, chat = update.effective_user, update.effective_chat
        if user is None or user.is_bot:
            raise ApplicationHandlerStop
        is_ours = update.callback_query is not None or self._ours(update.message)
        allowed = self.settings.telegram_allowed_chats
        if allowed and chat is not None and chat.id not in allowed:
            private_admin = chat.type == ChatType.PRIVATE and self.service.is_admin(user_ref(user))
            if not private_admin:
                if is_ours:
                    _log.info("ignored a command from chat %s: not in TELEGRAM_ALLOWED_CHATS", chat.id)
                if update.callback_query is not None:
                    await update.callback_query.answer("brushbot is not enabled in this chat")
                raise ApplicationHandlerStop
        if is_ours:
            # "seen" users can be named as @username in admin commands
            await self.service.seen(user_ref(user), display_name(user))

    @staticmethod
    async def _say(update: Update, text: str) -> None:
        message = update.effective_message
        if message is not None:
            await message.reply_text(text, do_quote=message.chat.type != ChatType.PRIVATE)

    async def _draw(self, update: Update, context: _Context) -> None:
        message, user = update.effective_message, update.effective_user
        assert message is not None and user is not None
        text = _command_text(message)
        if message.reply_to_message is not None and not split_flags(text).prompt.strip():
            borrowed = _replied_prompt(message, self.bot.id)
            text = f"{borrowed} {text}".strip()
        request = self.service.parse(text)
        # Telegram has no NSFW marker for groups: NSFW_WORDS are allowed in private chats only.
        await self.service.submit(
            user_ref(user),
            request,
            delivery=_delivery(message),
            user_name=display_name(user),
            nsfw_allowed=message.chat.type == ChatType.PRIVATE,
        )

    async def _credits(self, update: Update, context: _Context) -> None:
        assert update.effective_user is not None
        balance = await self.service.credits(user_ref(update.effective_user))
        await self._say(update, messages.balance_text(balance, self.service.next_refill_text()))

    async def _jobs(self, update: Update, context: _Context) -> None:
        assert update.effective_user is not None
        entries = await self.service.my_jobs(user_ref(update.effective_user))
        await self._say(update, messages.jobs_text(entries))

    async def _queue(self, update: Update, context: _Context) -> None:
        await self._say(update, messages.queue_text(self.service.queue_view()))

    async def _cancel(self, update: Update, context: _Context) -> None:
        assert update.effective_user is not None
        actor = user_ref(update.effective_user)
        if context.args:
            job_id = context.args[0]
        else:
            entries = await self.service.my_jobs(actor)
            live = [e for e in entries if e.job.state.cancellable]
            if not live:
                raise RequestError("you have no queued or running job; /jobs lists your jobs")
            job_id = live[0].job.id
        job = await self.service.cancel(actor, job_id)
        await self._say(update, messages.cancel_text(job))

    async def _help(self, update: Update, context: _Context) -> None:
        user = update.effective_user
        admin = user is not None and self.service.is_admin(user_ref(user))
        await self._say(update, messages.HELP + (f"\n\n{ADMIN_HELP}" if admin else ""))

    async def _start(self, update: Update, context: _Context) -> None:
        await self._say(update, "Hi! I draw pictures on the operator's GPU.\n\n" + messages.HELP)

    # ------------------------------------------------------------------ admin

    def _admin(self, update: Update) -> UserRef:
        """The acting admin; refused before any lookup so non-admins learn nothing."""
        assert update.effective_user is not None
        actor = user_ref(update.effective_user)
        self.service.require_admin(actor)
        return actor

    async def _target(
        self, message: Message, args: Sequence[str], values: int, usage: str
    ) -> tuple[UserRef, str, list[str]]:
        """The target user and the remaining values: ``<user> values...`` or a reply plus values."""
        if len(args) == values + 1:
            token, rest = args[0], list(args[1:])
            if _NUMERIC_ID.fullmatch(token):
                return UserRef(platform=PLATFORM, id=token), token, rest
            if _USERNAME.fullmatch(token):
                found = await self.service.find_user(PLATFORM, token)
                if found is None:
                    raise NotFoundError(
                        f"I have not seen {token} yet: use their numeric id or reply to one of their messages"
                    )
                return found, token, rest
            raise RequestError(f"{token[:40]} is not a user: use a numeric id or @username. Usage: {usage}")
        replied = message.reply_to_message
        if len(args) == values and replied is not None and replied.from_user is not None:
            person = replied.from_user
            if person.is_bot:
                raise RequestError("reply to a message of a person, not of a bot")
            return user_ref(person), display_name(person), list(args)
        raise RequestError(f"usage: {usage}")

    @staticmethod
    def _balance_line(who: str, balance: Any) -> str:
        return (
            f"{balance.available} credit(s) available for {who}: used {balance.used} of "
            f"{balance.allowance} this period, bonus {balance.bonus}."
        )

    async def _quota(self, update: Update, context: _Context) -> None:
        actor = self._admin(update)
        message = update.effective_message
        assert message is not None
        args = list(context.args or [])
        usage = "/quota show|set|grant|reset <user> [credits]"
        sub = args[0].lower() if args else ""
        needs = {"show": 0, "reset": 0, "set": 1, "grant": 1}
        if sub not in needs:
            raise RequestError(f"usage: {usage}")
        target, who, values = await self._target(
            message, args[1:], needs[sub], f"/quota {sub} <user>" + (" <credits>" if needs[sub] else "")
        )
        if sub == "show":
            view = await self.service.admin_show(actor, target)
            await self._say(update, messages.user_view_text(view))
            return
        if sub == "reset":
            balance = await self.service.admin_reset(actor, target)
            await self._say(update, "Usage reset. " + self._balance_line(who, balance))
            return
        raw = values[0]
        if sub == "set" and raw.lower() in ("default", "none"):
            amount: int | None = None
        else:
            if not re.fullmatch(r"[+-]?\d{1,9}", raw):
                raise RequestError(f"{raw[:20]} is not a whole number of credits")
            amount = int(raw)
        if sub == "set":
            balance = await self.service.admin_set(actor, target, amount)
            shown = "the default" if amount is None else str(amount)
            await self._say(update, f"Allowance set to {shown}. " + self._balance_line(who, balance))
        else:
            assert amount is not None
            balance = await self.service.admin_grant(actor, target, amount)
            await self._say(update, f"Granted {amount:+d}. " + self._balance_line(who, balance))

    async def _ban_or_unban(self, update: Update, context: _Context, banned: bool) -> None:
        actor = self._admin(update)
        message = update.effective_message
        assert message is not None
        verb = "ban" if banned else "unban"
        target, who, _ = await self._target(message, list(context.args or []), 0, f"/{verb} <user>")
        await self.service.admin_ban(actor, target, banned)
        await self._say(update, f"{who} ({target.key}) is {'banned' if banned else 'no longer banned'}.")

    async def _ban(self, update: Update, context: _Context) -> None:
        await self._ban_or_unban(update, context, True)

    async def _unban(self, update: Update, context: _Context) -> None:
        await self._ban_or_unban(update, context, False)

    async def _weight(self, update: Update, context: _Context) -> None:
        actor = self._admin(update)
        message = update.effective_message
        assert message is not None
        target, who, values = await self._target(
            message, list(context.args or []), 1, "/weight <user> <weight>"
        )
        try:
            weight = float(values[0])
        except ValueError:
            raise RequestError(f"{values[0][:20]} is not a number: a weight is like 0.5, 1 or 2") from None
        record = await self.service.admin_weight(actor, target, weight)
        await self._say(update, f"{who} ({target.key}) now has weight {record.weight:g} in the fair queue.")

    async def _stats(self, update: Update, context: _Context) -> None:
        actor = self._admin(update)
        await self._say(update, messages.stats_text(await self.service.stats(actor)))

    # ------------------------------------------------------------------ buttons

    async def _button(self, update: Update, context: _Context) -> None:
        query, user = update.callback_query, update.effective_user
        assert query is not None and user is not None
        parsed = parse_callback(query.data)
        if parsed is None or query.message is None:
            await query.answer()
            return
        action, job_id = parsed
        actor = user_ref(user)
        message = query.message
        chat = message.chat
        if action == "reroll":
            ticket = await self.service.reroll(
                actor,
                job_id,
                delivery=_delivery(message),
                user_name=display_name(user),
                nsfw_allowed=chat.type == ChatType.PRIVATE,
            )
            await query.answer(f"Rerolling as job {ticket.job.id}")
        elif action == "png":
            job = await self.service.job(job_id)
            await self._send_originals(job, chat.id, message.message_id)
            await query.answer("Original PNG sent")
        elif action == "del":
            job = await self.service.authorize_delete(actor, job_id)
            await self._delete_results(job, chat.id, message.message_id)
            await query.answer("Deleted")
        else:
            job = await self.service.cancel(actor, job_id)
            await query.answer("Cancelled" if job.state is JobState.CANCELLED else "Stopping…")

    async def _send_originals(self, job: Job, chat_id: int, reply_to: int) -> None:
        """The untouched PNG(s) as documents, so the ``parameters`` metadata survives."""
        if not job.outputs:
            raise RequestError(f"job {job.id} has no images yet")
        exists = await asyncio.to_thread(lambda: [os.path.exists(p) for p in job.outputs])
        if not all(exists):
            raise NotFoundError(f"the original files of job {job.id} are no longer on the server")
        files = [await self.service.upload_file(p, self.document_limit) for p in job.outputs]
        where = ReplyParameters(message_id=reply_to, allow_sending_without_reply=True)
        if len(files) == 1:
            await self.bot.send_document(
                chat_id,
                files[0].data,
                filename=files[0].filename,
                caption=f"Original PNG of job {job.id} · seed {job.seeds[0]}",
                reply_parameters=where,
            )
            return
        for start in range(0, len(files), 10):
            chunk = files[start : start + 10]
            media = [InputMediaDocument(f.data, filename=f.filename) for f in chunk]
            if len(media) == 1:
                await self.bot.send_document(
                    chat_id, chunk[0].data, filename=chunk[0].filename, reply_parameters=where
                )
            else:
                await self.bot.send_media_group(chat_id, media, reply_parameters=where)

    async def _delete_results(self, job: Job, chat_id: int, pressed: int) -> None:
        ids = {int(i) for i in job.delivery.get("result_message_ids", []) if str(i).isdigit()}
        ids.add(pressed)
        try:
            await self.bot.delete_messages(chat_id, sorted(ids))
        except BadRequest as err:
            _log.info("job %s: some result messages were already gone: %s", job.id, err.message)

    # ------------------------------------------------------------------ errors

    async def _on_error(self, update: object, context: _Context) -> None:
        """The one error hook: core errors become one line; anything else is logged with its traceback."""
        err = context.error
        if isinstance(err, BotError):
            text = _sentence(str(err))
            if isinstance(err, NoCreditsError):
                text += f". Credits refill at {self.service.next_refill_text()}."
        elif isinstance(err, TelegramError) and not isinstance(update, Update):
            _log.warning("Telegram: %s", err)  # polling hiccups; PTB retries
            return
        elif isinstance(err, Forbidden):
            _log.warning("Telegram refused a reply: %s", err)
            return
        else:
            _log.error("error while handling a Telegram update", exc_info=err)
            text = GENERIC_ERROR
        if not isinstance(update, Update):
            return
        try:
            if update.callback_query is not None:
                await update.callback_query.answer(text[:200], show_alert=True)
            else:
                await self._say(update, text)
        except TelegramError as reply_err:
            _log.warning("could not send the error reply: %s", reply_err)


__all__ = [
    "PLATFORM",
    "TelegramAdapter",
    "TelegramReply",
    "Webhook",
    "callback_data",
    "parse_callback",
]

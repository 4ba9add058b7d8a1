"""The Telegram adapter's lifecycle: connect, register handlers and the command menu, poll, stop.

``TelegramAdapter(service, settings)`` is an async context manager. Updates come in by long
polling (or a webhook); the command handlers (``commands``, ``admin``), the buttons and the one
error hook turn them into core calls; the transport carries what the core says back.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from telegram import BotCommand, BotCommandScopeChat, BotCommandScopeDefault, Message, MessageEntity, Update
from telegram.constants import ChatType
from telegram.error import InvalidToken, TelegramError
from telegram.ext import (
    Application,
    ApplicationHandlerStop,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    ExtBot,
    MessageHandler,
    TypeHandler,
    filters,
)
from telegram.request import HTTPXRequest

from adapters.telegram.admin import ADMIN_COMMANDS, NUMERIC_ID, AdminCommands
from adapters.telegram.buttons import Buttons
from adapters.telegram.commands import PUBLIC_COMMANDS
from adapters.telegram.delivery import PLATFORM, display_name, user_ref
from adapters.telegram.errors import START_ATTEMPTS, ErrorHook, answer_press, waiting_out_floods
from adapters.telegram.transport import (
    DOCUMENT_LIMIT,
    GROUP_LIMIT,
    GROUP_WINDOW,
    PHOTO_LIMIT,
    PRIVATE_LIMIT,
    PRIVATE_WINDOW,
    TelegramTransport,
)
from bot import messages
from bot.config import Settings
from bot.errors import ConfigError
from bot.logs import guard_logs
from bot.service import Service

_log = logging.getLogger(__name__)

#: top-level logger names whose records get the token redacted at the source
_REDACTED_LOGGERS = ("telegram", "httpx", "httpcore", "adapters", "bot", "data", "generation", "asyncio")

_Context = ContextTypes.DEFAULT_TYPE
#: a caption that is a /draw command, for this bot or any
_DRAW_CAPTION = r"^/draw(@\w+)?(\s|$)"
App = Application[ExtBot[None], _Context, dict[Any, Any], dict[Any, Any], dict[Any, Any], None]
_Handler = Callable[[Update, _Context], Coroutine[Any, Any, None]]


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


def api_url(base: str | None, suffix: str) -> str | None:
    """``http://host:8081`` → ``http://host:8081/bot`` (PTB appends the token)."""
    if not base:
        return None
    base = base.rstrip("/")
    if "{token}" in base or base.endswith(suffix):
        return base
    return base + suffix


class TelegramAdapter:
    """Runs the Telegram bot: commands in, the core's messages out.

    ``group_limit``/``group_window`` and ``private_limit``/``private_window`` are the chats'
    message budgets (Telegram: 20 in any 60 s per group, about one a second per private chat).
    """

    def __init__(
        self,
        service: Service,
        settings: Settings,
        *,
        group_limit: int = GROUP_LIMIT,
        group_window: float = GROUP_WINDOW,
        private_limit: int = PRIVATE_LIMIT,
        private_window: float = PRIVATE_WINDOW,
        poll_timeout: float = 30.0,
        webhook: Webhook | None = None,
        photo_limit: int = PHOTO_LIMIT,
        document_limit: int = DOCUMENT_LIMIT,
    ) -> None:
        self.service = service
        self.settings = settings
        self.transport = TelegramTransport(
            service,
            group_limit=group_limit,
            group_window=group_window,
            private_limit=private_limit,
            private_window=private_window,
            photo_limit=photo_limit,
            document_limit=document_limit,
        )
        self._commands = AdminCommands(service)
        self._buttons = Buttons(service, document_limit)
        self._poll_timeout = poll_timeout
        self._webhook = webhook
        self._app: App | None = None
        self._requests: tuple[HTTPXRequest, HTTPXRequest] | None = None
        self._unguard: Callable[[], None] | None = None
        self._levels: dict[str, int] = {}
        self.closed = False

    def __repr__(self) -> str:
        return f"TelegramAdapter(running={self._app is not None})"

    async def __aenter__(self) -> TelegramAdapter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def app(self) -> App:
        if self._app is None:
            raise RuntimeError("the Telegram adapter is not started")
        return self._app

    @property
    def bot(self) -> ExtBot[None]:
        return self.app.bot

    async def start(self) -> None:
        """Connect (getMe), register with the service and the command menu, then poll (or webhook)."""
        secret = self.settings.telegram_token
        token = secret.get_secret_value().strip() if secret is not None else ""
        if not token:
            raise ConfigError("TELEGRAM_TOKEN is not set")
        self._guard_logs(token)
        app = self._build(token)
        try:
            await waiting_out_floods("getMe", app.initialize)
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
            self.transport.attach(app.bot)
            self.service.register(self.transport)
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

    async def _receive(self, app: App) -> None:
        """Start getting updates: long polling, or a webhook when one is configured."""
        updater = app.updater
        assert updater is not None
        allowed = [Update.MESSAGE, Update.CALLBACK_QUERY]
        if self._webhook is None:
            await updater.start_polling(  # its deleteWebhook waits out 429s like getMe
                timeout=dt.timedelta(seconds=self._poll_timeout),
                allowed_updates=allowed,
                bootstrap_retries=START_ATTEMPTS,
            )
            return
        hook = self._webhook
        try:
            await updater.start_webhook(
                listen=hook.listen, port=hook.port, url_path=hook.path, webhook_url=hook.url,
                secret_token=hook.secret_token, allowed_updates=allowed, bootstrap_retries=START_ATTEMPTS,
            )  # fmt: skip
        except RuntimeError as err:  # PTB without its "webhooks" extra
            raise ConfigError(f"webhook mode is not available: {err}") from None

    async def finish_intake(self) -> None:
        """Stop fetching updates and handle the ones already fetched, then send their answers.

        Telegram counts a fetched update as delivered, so one left in the queue at exit is a
        command nobody ever answers; called after the service's drain, before it closes.
        """
        app = self._app
        if app is None:
            return
        if app.updater is not None and app.updater.running:
            await app.updater.stop()
        if app.running:
            await app.stop()  # handles every update still queued
        await self.service.status.flushed()

    async def close(self) -> None:
        """Stop polling and handlers, close the HTTP clients; unfinished jobs stay in the store."""
        self.closed = True
        self.transport.attach(None)
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

    def _build(self, token: str) -> App:
        # Bodies go to Telegram, answers are small: a generous write timeout covers 10 MB photos.
        request = HTTPXRequest(connection_pool_size=64, read_timeout=20.0, write_timeout=30.0,
                               media_write_timeout=120.0)  # fmt: skip
        updates = HTTPXRequest(connection_pool_size=2, read_timeout=10.0)
        self._requests = (request, updates)
        # No PTB rate limiter: the core's budgets keep each chat within Telegram's limits, and a
        # 429 that arrives anyway reaches the core, which waits it out and sends again.
        builder = (
            Application.builder().token(token).request(request).get_updates_request(updates)
            .concurrent_updates(32).job_queue(None)
        )  # fmt: skip
        base_url = api_url(self.settings.telegram_base_url, "/bot")
        if base_url:
            builder = builder.base_url(base_url)
        file_url = api_url(self.settings.telegram_base_file_url, "/file/bot")
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

    def _add_handlers(self, app: App) -> None:
        app.add_handler(TypeHandler(Update, self._gate), group=-1)
        # not edited messages (editing a /draw must not draw again), not forwarded ones (a
        # forwarded /draw is someone else's request: whoever forwards it must not be charged)
        fresh = filters.UpdateType.MESSAGE & ~filters.FORWARDED
        c = self._commands
        commands: dict[str, _Handler] = {
            "draw": c.draw, "credits": c.credits, "jobs": c.jobs, "queue": c.queue, "cancel": c.cancel,
            "help": c.help, "start": c.start, "quota": c.quota, "ban": c.ban, "unban": c.unban,
            "weight": c.weight, "stats": c.stats,
        }  # fmt: skip
        for name, callback in commands.items():
            app.add_handler(CommandHandler(name, callback, filters=fresh))
        # a photo or image file whose caption is a /draw: CommandHandler reads only text
        captioned = fresh & (filters.PHOTO | filters.Document.ALL) & filters.CaptionRegex(_DRAW_CAPTION)
        app.add_handler(MessageHandler(captioned, self._captioned_draw))
        # every press reaches only the bot whose message holds the keyboard: all are answered,
        # unknown or malformed payloads with nothing, so no client is left spinning
        app.add_handler(CallbackQueryHandler(self._buttons))
        app.add_error_handler(ErrorHook(self.service, PLATFORM))

    async def _register_commands(self) -> None:
        bot = self.bot
        public = [BotCommand(name, text) for name, text in PUBLIC_COMMANDS]
        try:
            await waiting_out_floods(
                "setMyCommands", lambda: bot.set_my_commands(public, scope=BotCommandScopeDefault())
            )
        except TelegramError as err:
            _log.warning("could not register the Telegram command list: %s", err)
        # Admins see the admin commands in their private chat with the bot.
        admin_commands = public + [BotCommand(name, text) for name, text in ADMIN_COMMANDS]
        for key in sorted(self.settings.admins):
            platform, _, ident = key.partition(":")
            if platform != PLATFORM or not NUMERIC_ID.fullmatch(ident):
                continue
            try:
                scope = BotCommandScopeChat(int(ident))
                await waiting_out_floods(
                    "setMyCommands", functools.partial(bot.set_my_commands, admin_commands, scope=scope)
                )
            except TelegramError as err:  # "chat not found" until the admin has started the bot
                _log.info("admin command list not set for %s: %s", key, err)

    def _ours(self, message: Message | None) -> bool:
        """Whether the message (or a photo's caption) is a command for this bot (not ``/draw@otherbot``)."""
        if message is None or message.forward_origin is not None:
            return False
        text, entities = message.text or message.caption, message.entities or message.caption_entities
        if not text or not entities:
            return False
        entity = entities[0]
        if entity.type != MessageEntity.BOT_COMMAND or entity.offset != 0:
            return False
        _, _, target = text[1 : entity.length].partition("@")
        return not target or target.lower() == str(self.bot.username).lower()

    async def _captioned_draw(self, update: Update, context: _Context) -> None:
        if self._ours(update.effective_message):
            await self._commands.draw(update, context)

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
                    await answer_press(update.callback_query, messages.NOT_ENABLED_HERE)
                raise ApplicationHandlerStop
        if is_ours:
            # "seen" users can be named as @username in admin commands
            await self.service.seen(user_ref(user), display_name(user))

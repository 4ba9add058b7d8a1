"""Telegram errors: Bot API failures as core errors, and the adapter's one error hook."""

from __future__ import annotations

import datetime as dt
import logging
import math

from telegram import Update
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError, TimedOut
from telegram.ext import ContextTypes

from adapters.telegram.delivery import delivery_of
from bot import messages
from bot.errors import BotError, DeliveryError, MessageRefusedError, RateLimitedError, UnreachableError
from bot.service import Service

_log = logging.getLogger(__name__)

# Bad requests that mean "this photo cannot be a photo" (too big, odd dimensions): send a document
_PHOTO_REJECTED = (
    "photo",
    "image_process_failed",
    "too big",
    "dimensions",
    "entity too large",
    "file is too",
)


# Bad requests that mean the chat itself is gone: nothing more can be said there
_CHAT_GONE = ("chat not found", "group chat was upgraded", "chat_write_forbidden", "have no rights to send")


def core_error(err: TelegramError) -> DeliveryError:
    """A Telegram failure as a core delivery error: unreachable ones are not retried, 429s are waited out."""
    if isinstance(err, RetryAfter):
        after = err.retry_after
        seconds = after.total_seconds() if isinstance(after, dt.timedelta) else float(after)
        return RateLimitedError(max(1.0, math.ceil(seconds)))
    if isinstance(err, Forbidden):
        return UnreachableError("the bot was removed from this chat or blocked")
    if isinstance(err, BadRequest):
        if any(s in err.message.lower() for s in _CHAT_GONE):
            return UnreachableError(f"Telegram: {err.message}")
        return MessageRefusedError(f"Telegram refused the message ({err.message})")
    if isinstance(err, TimedOut):
        return DeliveryError("Telegram did not answer in time")
    return DeliveryError(f"Telegram error ({err.message})")


def photo_rejected(err: TelegramError) -> bool:
    """Telegram will not take this picture as a photo (a document may do)."""
    return (
        isinstance(err, NetworkError)
        and not isinstance(err, TimedOut)
        and any(s in err.message.lower() for s in _PHOTO_REJECTED)
    )


class ErrorHook:
    """PTB's one error handler: core errors become their one line, anything else is logged."""

    def __init__(self, service: Service, platform: str) -> None:
        self._service = service
        self._platform = platform

    async def __call__(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        err = context.error
        if isinstance(err, BotError):
            text = messages.error_text(err, self._service.next_refill_text())
        elif isinstance(err, TelegramError) and not isinstance(update, Update):
            _log.warning("Telegram: %s", err)  # polling hiccups; PTB retries
            return
        elif isinstance(err, Forbidden):
            _log.warning("Telegram refused a reply: %s", err)
            return
        else:
            _log.error("error while handling a Telegram update", exc_info=err)
            text = messages.GENERIC_ERROR
        if not isinstance(update, Update):
            return
        try:
            if update.callback_query is not None:
                await update.callback_query.answer(text[:200], show_alert=True)
            elif update.effective_message is not None:
                self._service.status.say(self._platform, delivery_of(update.effective_message), text)
        except TelegramError as reply_err:
            _log.warning("could not send the error reply: %s", reply_err)

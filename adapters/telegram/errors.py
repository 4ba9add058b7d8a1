"""Telegram errors: Bot API failures as core errors, and the adapter's one error hook."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

from telegram import CallbackQuery, Update
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError, TimedOut
from telegram.ext import ContextTypes

from adapters.telegram.delivery import delivery_of
from bot import messages
from bot.errors import BotError, DeliveryError, MessageRefusedError, RateLimitedError, UnreachableError
from bot.service import Service

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
#: how many flood-control answers a start-up call waits out before the start fails
START_ATTEMPTS = 30

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


def retry_seconds(err: RetryAfter) -> float:
    """The wait a flood-control answer asks for, in whole seconds (at least one)."""
    after = err.retry_after
    seconds = after.total_seconds() if isinstance(after, dt.timedelta) else float(after)
    return max(1.0, math.ceil(seconds))


async def waiting_out_floods(
    what: str,
    call: Callable[[], Awaitable[_T]],
    *,
    attempts: int = START_ATTEMPTS,
    longest: float | None = None,
) -> _T:
    """``call()``, waiting out Telegram's 429s (a restarted bot may meet the limits its last run reached).

    Gives up (raises the ``RetryAfter``) after ``attempts`` tries, or at once when Telegram asks
    for a wait longer than ``longest`` seconds.
    """
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except RetryAfter as err:
            seconds = retry_seconds(err)
            if attempt == attempts or (longest is not None and seconds > longest):
                raise
            _log.warning("Telegram flood control on %s: trying again in %.0f s", what, seconds)
            await asyncio.sleep(seconds)
    raise AssertionError("unreachable")


async def answer_press(query: CallbackQuery, text: str | None = None, *, show_alert: bool = False) -> None:
    """Answer a button press. The answer is only a toast: when Telegram will not take it (flood
    control longer than a few seconds, a press too old) that is logged, never raised, so the work
    the press did is not reported as a failure (and pressed again)."""
    try:
        await waiting_out_floods(
            "answerCallbackQuery", functools.partial(query.answer, text, show_alert=show_alert),
            attempts=3, longest=5.0,
        )  # fmt: skip
    except TelegramError as err:
        _log.warning("could not answer a button press: %s", err)


def core_error(err: TelegramError) -> DeliveryError:
    """A Telegram failure as a core delivery error: unreachable ones are not retried, 429s are waited out."""
    if isinstance(err, RetryAfter):
        return RateLimitedError(retry_seconds(err))
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
                await answer_press(update.callback_query, text[:200], show_alert=True)
            elif update.effective_message is not None:
                self._service.status.say(self._platform, delivery_of(update.effective_message), text)
        except TelegramError as reply_err:
            _log.warning("could not send the error reply: %s", reply_err)

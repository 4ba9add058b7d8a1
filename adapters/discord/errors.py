"""Discord errors: token redaction, Discord failures as core errors, and the adapter's one error hook.

``ErrorHook`` is the command tree's ``on_error`` (and wraps button and form handlers too): a
core error becomes its one line from ``bot.messages``, shown only to the user who acted; anything
else is logged with its traceback and the user reads the generic line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable

import aiohttp
import discord
from discord import app_commands

from adapters.discord.delivery import SUBMITTED, THINKING, Interaction
from adapters.discord.text import inert
from bot import messages
from bot.errors import BotError, DeliveryError, MessageRefusedError, RateLimitedError, UnreachableError
from bot.service import Service

_log = logging.getLogger(__name__)

MAX_CONTENT = 2000
# interaction tokens appear in webhook URLs and in the gateway payloads discord.py logs at DEBUG
URL_TOKEN = re.compile(r"(/(?:webhooks|interactions)/\d+/)[A-Za-z0-9_.\-]+")
FIELD_TOKEN = re.compile(r"""(['"]token['"]\s*:\s*['"])[^'"]+""")
#: loggers (and their children) whose records get the tokens redacted at the source
REDACTED_LOGGERS = ("discord", "aiosqlite", "adapters", "bot", "data", "generation", "asyncio")
#: network trouble worth retrying later
TRANSIENT = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


class TooLarge(Exception):
    """Discord refused the upload as too large (413): try a smaller encoding."""


def webhook_gone(exc: discord.HTTPException) -> bool:
    """The interaction token expired or is unknown: use the channel instead."""
    return exc.status == 401 or exc.code in (10015, 50027, 10062)


def message_gone(exc: discord.HTTPException) -> bool:
    return exc.status == 404 and exc.code == 10008


def chat_gone(exc: discord.HTTPException) -> bool:
    """The channel is deleted or the bot may not use it: retrying will not help."""
    return isinstance(exc, discord.Forbidden) or (exc.status == 404 and not message_gone(exc))


def too_large(exc: discord.HTTPException) -> bool:
    return exc.status == 413 or exc.code == 40005


def core_error(exc: BaseException) -> DeliveryError:
    """A Discord failure as a core delivery error: a gone chat is not retried, a rate limit is waited out."""
    if isinstance(exc, discord.RateLimited):
        return RateLimitedError(exc.retry_after)
    if isinstance(exc, discord.HTTPException):
        if exc.status == 429:  # discord.py's own retries ran out in a storm: the lane waits it out
            return RateLimitedError(_retry_after(exc))
        if chat_gone(exc):
            return UnreachableError(f"the channel is gone or closed to the bot ({exc.status})")
        if exc.status == 400:  # a bad request stays bad: not retried, the requester is told
            return MessageRefusedError(f"Discord refused the message ({exc.code or 'no code'})")
        return DeliveryError(f"Discord answered {exc.status} ({exc.code or 'no code'})")
    return DeliveryError(f"could not reach Discord ({type(exc).__name__})")


def _retry_after(exc: discord.HTTPException) -> float:
    """The wait a 429 asks for (its ``Retry-After`` header), at least a second when it names none."""
    headers = getattr(exc.response, "headers", None) or {}
    try:
        return max(1.0, float(headers.get("Retry-After", 1.0)))
    except (TypeError, ValueError):
        return 1.0


class ErrorHook:
    """The one error hook: maps an error to the line the user reads, privately."""

    def __init__(self, service: Service) -> None:
        self._service = service

    async def guard(self, interaction: Interaction, handler: Awaitable[None]) -> None:
        """Run a button or form handler with the same error mapping as the command tree."""
        try:
            await handler
        except Exception as exc:
            await self.report(interaction, exc)

    async def on_app_command_error(
        self, interaction: Interaction, error: app_commands.AppCommandError
    ) -> None:
        original = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        await self.report(interaction, original)

    def text(self, interaction: Interaction, error: BaseException) -> str:
        if isinstance(error, BotError):
            return messages.error_text(error, self._service.next_refill_text())
        if isinstance(error, app_commands.CommandNotFound):
            return messages.OUT_OF_DATE_COMMAND
        if isinstance(error, app_commands.NoPrivateMessage):
            return messages.SERVER_ONLY
        if isinstance(error, app_commands.MissingPermissions | app_commands.CheckFailure):
            return messages.NOT_ALLOWED_HERE
        if isinstance(error, app_commands.TransformerError):
            return messages.bad_value_text(error.type.name.lower())
        _log.error(
            "Discord interaction %s by %s failed", interaction.id, interaction.user.id,
            exc_info=(type(error), error, error.__traceback__),
        )  # fmt: skip
        return messages.GENERIC_ERROR

    async def report(self, interaction: Interaction, error: BaseException) -> None:
        text = inert(self.text(interaction, error).splitlines()[0])[:MAX_CONTENT]
        try:
            if not interaction.response.is_done():
                await interaction.response.send_message(text, ephemeral=True)
                return
            if interaction.extras.get(THINKING) and not interaction.extras.get(SUBMITTED):
                # The public "thinking…" message would otherwise stay; the error is for the user only.
                with contextlib.suppress(discord.HTTPException):
                    await interaction.delete_original_response()
            await interaction.followup.send(text, ephemeral=True)
        except (discord.HTTPException, *TRANSIENT) as exc:
            _log.warning("Discord: could not show an error to %s: %s", interaction.user.id, exc)


__all__ = [
    "FIELD_TOKEN", "MAX_CONTENT", "REDACTED_LOGGERS", "TRANSIENT", "URL_TOKEN",
    "ErrorHook", "TooLarge", "chat_gone", "core_error", "message_gone", "too_large", "webhook_gone",
]  # fmt: skip

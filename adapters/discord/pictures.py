"""Pictures from Discord to draw from: a ``/draw`` image option, or any message's picture ("Vary this image").

Only platform attachments are fetched, never a URL a user typed: the declared size is checked
against ``MAX_INPUT_BYTES`` before the download, which has a time limit; the core then checks
the bytes (format by content, pixels before decoding) and refuses in one line, costing nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import discord

from adapters.discord.buttons import CUSTOM_ID_RE
from adapters.discord.delivery import Interaction, defer_then, nsfw_allowed, user_ref
from bot import messages
from bot.domain import VARY_SUBTLE, Ticket
from bot.errors import DeliveryError, RequestError
from bot.grammar import RawOptions
from bot.service import Service

#: seconds a picture may take to download
DOWNLOAD_TIMEOUT = 30.0
_PICTURE_NAMES = (".png", ".jpg", ".jpeg", ".webp")


async def fetch(service: Service, attachment: discord.Attachment) -> bytes:
    """The attachment's bytes: its declared size checked first, the download bounded in time."""
    service.check_picture_size(attachment.size)
    try:
        async with asyncio.timeout(DOWNLOAD_TIMEOUT):
            return await attachment.read()
    except TimeoutError:
        raise RequestError(f"the picture did not download within {DOWNLOAD_TIMEOUT:g} s") from None
    except discord.HTTPException as exc:
        raise DeliveryError(f"the picture could not be downloaded ({exc.status})") from None


def first_picture(message: discord.Message) -> discord.Attachment | None:
    """The message's first attachment that looks like a picture (the core checks its bytes)."""
    for attachment in message.attachments:
        kind = (attachment.content_type or "").lower()
        if kind.startswith("image/") or attachment.filename.lower().endswith(_PICTURE_NAMES):
            return attachment
    return None


def job_of(message: discord.Message) -> str | None:
    """The job a message of ours shows (from its buttons' custom ids), or None."""
    for row in message.components:
        for item in getattr(row, "children", ()):
            match = CUSTOM_ID_RE.fullmatch(str(getattr(item, "custom_id", "") or ""))
            if match is not None:
                return match["job"]
    return None


def prompt_of(message: discord.Message) -> str:
    """The prompt a message offers: its text (a ``/draw`` command's words; our caption's first line)."""
    text = message.content.strip()
    first, _, rest = text.partition(" ")
    if first.lower() == "/draw":
        text = rest.strip()
    return text.splitlines()[0].strip() if text else ""


class Vary:
    """The "Vary this image" message command: our result varies its job; any other picture uses its text."""

    def __init__(self, service: Service, expires: Callable[[], float]) -> None:
        self.service = service
        self.expires = expires

    async def __call__(self, interaction: Interaction, message: discord.Message) -> None:
        service, user = self.service, interaction.user
        actor = user_ref(user)
        me = interaction.client.user
        job_id = job_of(message) if me is not None and message.author.id == me.id else None
        if job_id is not None:  # our own result: its prompt and size, a new seed
            await defer_then(
                interaction,
                lambda delivery: service.vary(
                    actor, job_id, VARY_SUBTLE, delivery=delivery, user_name=user.display_name,
                    nsfw_allowed=nsfw_allowed(interaction),
                ),
                expires=self.expires(),
            )  # fmt: skip
            return
        picture = first_picture(message)
        if picture is None:
            raise RequestError(messages.NO_PICTURE_IN_MESSAGE)
        prompt = prompt_of(message)
        if not prompt:
            raise RequestError(messages.NO_PROMPT_FOR_PICTURE)
        service.check_picture_size(picture.size)

        async def submit(delivery: dict[str, Any]) -> Ticket:
            data = await fetch(service, picture)
            return await service.submit_picture(
                actor, RawOptions(prompt=prompt), data, delivery=dict(delivery), user_name=user.display_name,
                nsfw_allowed=nsfw_allowed(interaction),
            )  # fmt: skip

        await defer_then(interaction, submit, expires=self.expires())


__all__ = ["DOWNLOAD_TIMEOUT", "Vary", "fetch", "first_picture", "job_of", "prompt_of"]

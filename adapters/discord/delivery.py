"""Discord chat references: what a job keeps (interaction token, channel, status message) and its lanes.

Everything a job needs to reach its chat after a restart is in ``job.delivery``; nothing about a
job lives only in memory. Each interaction is a lane of its own (its webhook has its own
bucket), grouped by channel; once its token is too old to use, the job's lane is the channel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import discord

from bot.domain import Ticket, UserRef
from bot.ports import Lane, LaneKind

PLATFORM = "discord"
#: Discord's interaction tokens live 15 minutes; stop using one a little before that
TOKEN_LIFETIME = 15 * 60 - 30
#: used when an old delivery reference has no limit stored (Discord's default for bots)
DEFAULT_FILESIZE_LIMIT = 10 * 1024 * 1024
#: extras keys on an interaction: it was deferred publicly / its job was submitted
THINKING, SUBMITTED = "bb_thinking", "bb_submitted"

Interaction = discord.Interaction[discord.Client]


def user_ref(user: discord.abc.User) -> UserRef:
    """The core's reference to a Discord user."""
    return UserRef(platform=PLATFORM, id=str(user.id))


def token_key(token: str) -> str:
    """A lane key for an interaction token that does not contain the token (keys are logged)."""
    return f"{PLATFORM}:it:{hashlib.sha256(token.encode()).hexdigest()[:16]}"


def channel_key(channel_id: object) -> str:
    return f"{PLATFORM}:{channel_id}"


def delivery_of(interaction: Interaction, message_id: int, *, expires: float) -> dict[str, Any]:
    """The JSON-able reference a job carries: enough to edit its status or post in its channel later."""
    return {
        "app_id": str(interaction.application_id),
        "token": interaction.token,
        "token_expires": expires,
        "channel_id": str(interaction.channel_id),
        "guild_id": str(interaction.guild_id) if interaction.guild_id else None,
        "user_id": str(interaction.user.id),
        "message_id": str(message_id),
        "filesize_limit": int(interaction.filesize_limit or DEFAULT_FILESIZE_LIMIT),
    }


def token_valid(delivery: Mapping[str, Any], now: float) -> bool:
    """Whether the interaction token of a delivery may still be used."""
    return bool(delivery.get("token")) and float(delivery.get("token_expires", 0) or 0) > now


def lane_of(delivery: Mapping[str, Any], now: float) -> Lane:
    """The interaction's own lane while its token lives, else the channel's; grouped by channel."""
    channel = channel_key(delivery.get("channel_id", ""))
    if token_valid(delivery, now):
        return Lane(key=token_key(str(delivery["token"])), kind=LaneKind.INTERACTION, group=channel)
    return Lane(key=channel, kind=LaneKind.GROUP, group=channel)


def nsfw_allowed(interaction: Interaction) -> bool:
    """Whether the interaction's channel is marked NSFW (NSFW_WORDS are allowed only there)."""
    channel = interaction.channel
    return (
        isinstance(channel, discord.TextChannel | discord.Thread | discord.VoiceChannel) and channel.is_nsfw()
    )


__all__ = [
    "DEFAULT_FILESIZE_LIMIT", "PLATFORM", "SUBMITTED", "THINKING", "TOKEN_LIFETIME", "Interaction", "channel_key",
    "defer_then", "delivery_of",
    "lane_of", "nsfw_allowed", "token_key", "token_valid", "user_ref",
]  # fmt: skip


async def defer_then(
    interaction: Interaction, submit: Callable[[dict[str, Any]], Awaitable[Ticket]], *, expires: float
) -> Ticket:
    """Defer publicly (the 3-second rule), then submit with this interaction as the job's chat.

    The deferred "thinking…" response is the job's acknowledgement and, later, its status or
    result message.
    """
    response = await interaction.response.defer(thinking=True)
    interaction.extras[THINKING] = True
    message_id = response.message_id if response is not None else None
    if message_id is None:
        message_id = (await interaction.original_response()).id
    ticket = await submit(delivery_of(interaction, message_id, expires=expires))
    interaction.extras[SUBMITTED] = True
    return ticket

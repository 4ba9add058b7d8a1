"""The Discord transport: carries the core's status edits, results and notices, and learns the buckets.

It decides nothing about *when*: the core's status engine calls it within each lane's budget.
A lane is one interaction's webhook while its token lives (the deferred response is the job's
status message, edited in place, and finally its result), else the channel, where a late result
is a new message that mentions the requester. Budgets are ``LearnedBucket``s fed by an aiohttp
trace on discord.py's HTTP session: every answer's ``X-RateLimit-*`` headers (and any 429)
reach ``StatusEngine.observe`` for the lane the request belonged to. discord.py still waits out
and retries a 429 that arrives anyway.
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any, TypeVar

import aiohttp
import discord

from adapters.discord.buttons import result_view, status_view
from adapters.discord.delivery import (
    DEFAULT_FILESIZE_LIMIT,
    PLATFORM,
    channel_key,
    lane_of,
    token_key,
    token_valid,
)
from adapters.discord.errors import (
    MAX_CONTENT,
    TRANSIENT,
    TooLarge,
    core_error,
    message_gone,
    too_large,
    webhook_gone,
)
from adapters.discord.text import inert
from bot import messages
from bot.budget import Budget, LearnedBucket
from bot.domain import Job, SavedImage, UploadFile
from bot.errors import BotError, DeliveryError
from bot.ports import Lane, LaneKind, Phase
from bot.service import Service

_log = logging.getLogger(__name__)

MAX_FILES = 10
#: what a lane's bucket is taken to be until Discord's headers say otherwise
INTERACTION_BUCKET = (5, 2.0)  # an interaction's webhook: follow-ups and edits
CHANNEL_BUCKET = (5, 5.0)  # posting in a channel
_WEBHOOK_PATH = re.compile(r"/webhooks/\d+/([^/?]+)")
_CHANNEL_POST = re.compile(r"/channels/(\d+)/messages/?$")

_T = TypeVar("_T")


def lane_key_of(method: str, path: str) -> str | None:
    """The lane a REST request spends: an interaction's webhook, or posting in a channel."""
    webhook = _WEBHOOK_PATH.search(path)
    if webhook is not None:
        return token_key(webhook.group(1))
    channel = _CHANNEL_POST.search(path)
    if channel is not None and method.upper() == "POST":
        return channel_key(channel.group(1))
    return None


class DiscordTransport:
    """The ``Transport`` port for Discord; ``attach(client)`` once the client is logged in."""

    platform = PLATFORM

    def __init__(
        self, service: Service, *, spoiler: bool = False, clock: Callable[[], float] = time.time
    ) -> None:
        self.service = service
        self.spoiler = spoiler
        self._clock = clock
        self._client: discord.Client | None = None

    def attach(self, client: discord.Client | None) -> None:
        """The client to send with; ``None`` while stopped (sends then fail and are retried)."""
        self._client = client

    @property
    def client(self) -> discord.Client:
        if self._client is None or self._client.is_closed():
            raise DeliveryError("the Discord connection is closed")
        return self._client

    # ------------------------------------------------------------------ lanes and budgets

    def lane(self, delivery: Mapping[str, Any]) -> Lane:
        return lane_of(delivery, self._clock())

    def budget(self, lane: Lane) -> Budget:
        limit, period = INTERACTION_BUCKET if lane.kind is LaneKind.INTERACTION else CHANNEL_BUCKET
        return LearnedBucket(limit, period)

    def result_cost(self, job: Job, images: Sequence[SavedImage]) -> int:
        return 1  # up to ten files go in one message

    def trace(self) -> aiohttp.TraceConfig:
        """An aiohttp trace for discord.py's session: rate-limit headers go to the lanes' budgets."""
        config = aiohttp.TraceConfig()
        config.on_request_end.append(self._on_request_end)
        return config

    async def _on_request_end(
        self, session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        key = lane_key_of(params.method, params.url.path)
        if key is None:
            return
        headers = params.response.headers
        try:
            limit = int(headers["X-RateLimit-Limit"]) if "X-RateLimit-Limit" in headers else None
            if params.response.status == 429:
                after = headers.get("X-RateLimit-Reset-After") or headers.get("Retry-After") or "1"
                self.service.status.observe(key, limit=limit, remaining=0, reset_after=float(after))
            elif "X-RateLimit-Remaining" in headers:
                self.service.status.observe(
                    key, limit=limit, remaining=int(headers["X-RateLimit-Remaining"]),
                    reset_after=float(headers.get("X-RateLimit-Reset-After", "0")),
                )  # fmt: skip
        except ValueError:
            _log.debug("unreadable rate-limit headers on %s", params.url.path)

    # ------------------------------------------------------------------ plumbing

    async def _call(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """One Discord call, its failures as core errors."""
        try:
            return await call()
        except discord.HTTPException as exc:
            if too_large(exc):
                raise TooLarge from None
            raise core_error(exc) from None
        except (discord.RateLimited, *TRANSIENT) as exc:
            raise core_error(exc) from None

    def _webhook(self, job: Job) -> discord.Webhook:
        return discord.Webhook.partial(
            int(job.delivery["app_id"]), str(job.delivery["token"]), client=self.client
        )

    def _channel(self, job: Job) -> discord.PartialMessageable:
        guild = job.delivery.get("guild_id")
        return self.client.get_partial_messageable(
            int(job.delivery["channel_id"]), guild_id=int(guild) if guild else None
        )

    def _live(self, job: Job) -> bool:
        return token_valid(job.delivery, self._clock())

    async def _token_gone(self, job: Job) -> None:
        """Remember (in the store) that this job's interaction token no longer works."""
        await self.service.update_delivery(job.id, token_expires=0)

    async def _edit(self, job: Job, content: str, view: discord.ui.View | None) -> None:
        """Edit the job's status message: through the interaction while its token lives, else the channel."""
        message_id = int(job.delivery["message_id"])
        content = inert(content)[:MAX_CONTENT]
        try:
            if self._live(job):
                try:
                    await self._webhook(job).edit_message(message_id, content=content, view=view)
                    return
                except discord.HTTPException as exc:
                    if not webhook_gone(exc) or message_gone(exc):
                        raise
                    await self._token_gone(job)
            await self._channel(job).get_partial_message(message_id).edit(content=content, view=view)
        except discord.HTTPException as exc:
            if message_gone(exc):
                return  # someone deleted the status message: nothing left to update
            raise core_error(exc) from None
        except (discord.RateLimited, *TRANSIENT) as exc:
            raise core_error(exc) from None

    def _mention(self, job: Job) -> tuple[str, discord.AllowedMentions]:
        user_id = int(job.delivery["user_id"])
        return f"<@{user_id}> ", discord.AllowedMentions(users=[discord.Object(id=user_id)])

    # ------------------------------------------------------------------ the Transport port

    async def status(self, job: Job, text: str, phase: Phase) -> None:
        await self._edit(job, text, status_view(job.id))

    async def notice(self, job: Job, text: str) -> None:
        if self._live(job):
            await self._edit(job, text, None)
            return
        # The requester may have stopped watching: tell them with a mention.
        try:
            await self._edit(job, text, None)
        except BotError as err:
            _log.debug("job %s: status not edited: %s", job.id, err)
        mention, allowed = self._mention(job)
        await self._call(
            lambda: self._channel(job).send((mention + inert(text))[:MAX_CONTENT], allowed_mentions=allowed)
        )

    async def say(self, delivery: Mapping[str, Any], text: str) -> None:
        """A line for the user of ``delivery``: privately while its token lives, else in the channel."""
        client = self.client
        if token_valid(delivery, self._clock()):
            webhook = discord.Webhook.partial(int(delivery["app_id"]), str(delivery["token"]), client=client)
            await self._call(lambda: webhook.send(inert(text)[:MAX_CONTENT], ephemeral=True))
            return
        channel = client.get_partial_messageable(int(delivery["channel_id"]))
        await self._call(lambda: channel.send(inert(text)[:MAX_CONTENT]))

    async def board(self, lane: Lane, text: str | None) -> None:
        """Discord lanes have no board: a busy channel's acknowledgements are the deferred responses."""

    async def result(self, job: Job, images: Sequence[SavedImage], caption: str) -> None:
        if not images:
            raise DeliveryError("there is nothing to deliver")
        limit = int(job.delivery.get("filesize_limit") or DEFAULT_FILESIZE_LIMIT)
        shown = list(images[:MAX_FILES])
        for _attempt in range(4):
            uploads = [await self.service.upload_file(image.path, limit) for image in shown]
            try:
                message = await self._send_result(job, shown, uploads, caption)
            except TooLarge:
                # Discord measures the whole request too: fit each file into a smaller share.
                limit //= 2
                _log.info("job %s: upload refused as too large; trying %d bytes per file", job.id, limit)
                continue
            # Delivered: from here on nothing may raise, or the core would send it all again.
            try:
                await self.service.update_delivery(job.id, result_message_id=str(message.id))
            except Exception:
                _log.exception("job %s: delivered, but its message id was not recorded", job.id)
            return
        raise DeliveryError("the images are too large for Discord even when re-encoded")

    # ------------------------------------------------------------------ results

    def _files(self, uploads: Sequence[UploadFile], images: Sequence[SavedImage]) -> list[discord.File]:
        return [
            discord.File(
                io.BytesIO(upload.data), filename=upload.filename, spoiler=self.spoiler,
                description=f"seed {image.seed}",
            )
            for upload, image in zip(uploads, images, strict=False)
        ]  # fmt: skip

    @staticmethod
    def _text(caption: str, uploads: Sequence[UploadFile], room: int) -> str:
        reencoded = sorted({u.format.upper() for u in uploads if u.reencoded})
        note = messages.reencoded_note(reencoded) if reencoded else ""
        caption = inert(caption)
        return caption[: max(0, room - len(note))] + note

    async def _send_result(
        self, job: Job, images: Sequence[SavedImage], uploads: Sequence[UploadFile], caption: str
    ) -> discord.Message:
        if self._live(job):
            sent = await self._by_interaction(job, images, uploads, caption)
            if sent is not None:
                return sent
        mention, allowed = self._mention(job)
        message = await self._call(
            lambda: self._channel(job).send(
                mention + self._text(caption, uploads, MAX_CONTENT - len(mention)),
                files=self._files(uploads, images), view=result_view(job.id), allowed_mentions=allowed,
            )
        )  # fmt: skip
        # the old status message now points at the result (best effort)
        try:
            await self._edit(job, messages.moved_text(job, message.jump_url), None)
        except BotError as err:
            _log.debug("job %s: the old status was not updated: %s", job.id, err)
        return message

    async def _by_interaction(
        self, job: Job, images: Sequence[SavedImage], uploads: Sequence[UploadFile], caption: str
    ) -> discord.Message | None:
        """Turn the status (or "thinking…") message into the result; None when the token no longer works."""
        webhook = self._webhook(job)
        content = self._text(caption, uploads, MAX_CONTENT)
        try:
            try:
                return await webhook.edit_message(
                    int(job.delivery["message_id"]), content=content,
                    attachments=self._files(uploads, images), view=result_view(job.id),
                )  # fmt: skip
            except discord.HTTPException as exc:
                if not message_gone(exc):
                    raise
            # the status message was deleted: post the result as a follow-up instead
            return await webhook.send(
                content, files=self._files(uploads, images), view=result_view(job.id), wait=True
            )
        except discord.HTTPException as exc:
            if too_large(exc):
                raise TooLarge from None
            if webhook_gone(exc):
                await self._token_gone(job)
                return None
            raise core_error(exc) from None
        except (discord.RateLimited, *TRANSIENT) as exc:
            raise core_error(exc) from None


__all__ = ["CHANNEL_BUCKET", "INTERACTION_BUCKET", "DiscordTransport", "lane_key_of"]

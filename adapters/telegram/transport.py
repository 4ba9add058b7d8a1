"""The Telegram transport: carries the core's status messages, results, notices and boards.

It decides nothing about *when*: the core's status engine calls it within each chat's budget.
It knows Telegram's shapes: a status message edited in place, a photo (or a document when
Telegram refuses the photo) as a reply to the request, an album plus a keyboard message for
several images, one board message per busy group. Message ids go into ``job.delivery`` through
the service, so a restart can edit and delete them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from telegram import (
    InlineKeyboardMarkup,
    InputMediaDocument,
    InputMediaPhoto,
    Message,
    ReplyParameters,
)
from telegram.constants import ChatAction, ChatType
from telegram.error import ChatMigrated, TelegramError
from telegram.ext import ExtBot

from adapters.telegram.buttons import cancel_markup, result_markup
from adapters.telegram.errors import core_error, photo_rejected
from bot import messages
from bot.budget import Budget, SlidingWindow
from bot.domain import Job, SavedImage, UploadFile
from bot.errors import BotError, DeliveryError, UnreachableError
from bot.ports import Lane, LaneKind, Phase
from bot.service import Service

_log = logging.getLogger(__name__)

PLATFORM = "telegram"
#: Bot API upload limits: photos are recompressed by Telegram, documents are kept byte for byte
PHOTO_LIMIT = 10 * 1024 * 1024
DOCUMENT_LIMIT = 50 * 1024 * 1024
#: a group may receive at most 20 messages in any 60 s (album items, edits and reactions count)
GROUP_LIMIT, GROUP_WINDOW = 20, 60.0
#: a private chat: about one message a second
PRIVATE_LIMIT, PRIVATE_WINDOW = 1, 1.0

_T = TypeVar("_T")


def chat_id_of(delivery: Mapping[str, Any]) -> int | None:
    value = delivery.get("chat_id")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return None


def where(delivery: Mapping[str, Any], *, reply: bool = True) -> dict[str, Any]:
    """Reply parameters and forum topic of a delivery reference (keyword arguments for the Bot API)."""
    kwargs: dict[str, Any] = {}
    message_id = delivery.get("message_id")
    if reply and isinstance(message_id, int):
        kwargs["reply_parameters"] = ReplyParameters(message_id=message_id, allow_sending_without_reply=True)
    thread = delivery.get("thread_id")
    if isinstance(thread, int):
        kwargs["message_thread_id"] = thread
    return kwargs


class TelegramTransport:
    """The ``Transport`` port for Telegram; ``attach(bot)`` once the application is initialised."""

    platform = PLATFORM

    def __init__(
        self,
        service: Service,
        *,
        group_limit: int = GROUP_LIMIT,
        group_window: float = GROUP_WINDOW,
        private_limit: int = PRIVATE_LIMIT,
        private_window: float = PRIVATE_WINDOW,
        photo_limit: int = PHOTO_LIMIT,
        document_limit: int = DOCUMENT_LIMIT,
    ) -> None:
        self.service = service
        self.group_limit, self.group_window = group_limit, group_window
        self.private_limit, self.private_window = private_limit, private_window
        self.photo_limit = photo_limit
        self.document_limit = document_limit
        self._bot: ExtBot[None] | None = None
        self._boards: dict[str, tuple[int, str]] = {}  # lane key -> (message id, text)

    def attach(self, bot: ExtBot[None] | None) -> None:
        """The bot to send with; ``None`` while the adapter is stopped (sends then fail and are retried)."""
        self._bot = bot

    @property
    def bot(self) -> ExtBot[None]:
        if self._bot is None:
            raise DeliveryError("the Telegram adapter is stopping")
        return self._bot

    # ------------------------------------------------------------------ lanes and budgets

    def lane(self, delivery: Mapping[str, Any]) -> Lane:
        chat = chat_id_of(delivery)
        private = delivery.get("chat_type") == ChatType.PRIVATE
        kind = LaneKind.PRIVATE if private else LaneKind.GROUP
        return Lane(key=f"{PLATFORM}:{chat}", kind=kind, board=not private)

    def budget(self, lane: Lane) -> Budget:
        if lane.kind is LaneKind.PRIVATE:
            return SlidingWindow(self.private_limit, self.private_window)
        return SlidingWindow(self.group_limit, self.group_window)

    def result_cost(self, job: Job, images: Sequence[SavedImage]) -> int:
        # an album cannot carry buttons: its keyboard is one more message
        return 1 if len(images) <= 1 else len(images) + 1

    # ------------------------------------------------------------------ plumbing

    async def _call(self, job: Job | None, delivery: Mapping[str, Any], call: Callable[..., Awaitable[_T]],
                    **kwargs: Any) -> _T:  # fmt: skip
        """A Bot API call in the delivery's chat, following a migration to a supergroup once."""
        chat = chat_id_of(delivery)
        if chat is None:
            raise UnreachableError("the job has no Telegram chat to reply to")
        try:
            try:
                return await call(chat_id=chat, **kwargs)
            except ChatMigrated as err:
                if job is not None:
                    await self.service.update_delivery(job.id, chat_id=int(err.new_chat_id))
                return await call(chat_id=int(err.new_chat_id), **kwargs)
        except TelegramError as err:
            raise core_error(err) from None

    async def _edit(self, job: Job, message_id: int, text: str, markup: InlineKeyboardMarkup | None) -> bool:
        """Edit one of the job's messages; False when it is gone (deleted by someone)."""
        try:
            await self._call(job, job.delivery, self.bot.edit_message_text, message_id=message_id, text=text,
                             reply_markup=markup)  # fmt: skip
        except UnreachableError as err:
            lowered = str(err).lower()
            if "not modified" in lowered:
                return True
            if "not found" in lowered or "can't be edited" in lowered:
                return False
            raise
        return True

    async def _delete(self, job: Job | None, delivery: Mapping[str, Any], message_id: int) -> None:
        try:
            await self._call(job, delivery, self.bot.delete_message, message_id=message_id)
        except BotError as err:
            _log.debug("message %s not deleted: %s", message_id, err)

    @staticmethod
    def _status_id(job: Job) -> int | None:
        value = job.delivery.get("status_message_id")
        return value if isinstance(value, int) else None

    # ------------------------------------------------------------------ the Transport port

    async def status(self, job: Job, text: str, phase: Phase) -> None:
        status = self._status_id(job)
        if status is not None and await self._edit(job, status, text, cancel_markup(job.id)):
            return
        if phase is Phase.DRAWING and status is not None:
            return  # the status was deleted by someone: progress does not post a new one
        sent = await self._call(job, job.delivery, self.bot.send_message, text=text,
                                reply_markup=cancel_markup(job.id), **where(job.delivery))  # fmt: skip
        await self.service.update_delivery(job.id, status_message_id=sent.message_id)

    async def result(self, job: Job, images: Sequence[SavedImage], caption: str) -> None:
        if not images:
            raise DeliveryError("there is nothing to deliver")
        if job.delivery.get("chat_type") == ChatType.PRIVATE:
            try:
                await self._call(job, job.delivery, self.bot.send_chat_action, action=ChatAction.UPLOAD_PHOTO)
            except BotError as err:
                _log.debug("job %s: no chat action: %s", job.id, err)
        if len(images) == 1:
            sent = [await self._single(job, images[0], caption)]
        else:
            sent = await self._album(job, images, caption)
        # Delivered: from here on nothing may raise, or the core would send it all again.
        ids = [m.message_id for m in sent]
        try:
            status = self._status_id(job)
            if len(images) > 1:
                ids.append(await self._album_keyboard(job, sent[0], len(images)))
            elif status is not None:
                await self._delete(job, job.delivery, status)
            await self.service.update_delivery(job.id, result_message_ids=ids)
        except Exception:
            _log.exception("job %s: delivered, but the follow-up failed", job.id)

    async def notice(self, job: Job, text: str) -> None:
        status = self._status_id(job)
        if status is not None and await self._edit(job, status, text, None):
            return
        await self._call(job, job.delivery, self.bot.send_message, text=text, **where(job.delivery))

    async def say(self, delivery: Mapping[str, Any], text: str) -> None:
        await self._call(None, delivery, self.bot.send_message, text=text,
                         **where(delivery, reply=delivery.get("chat_type") != ChatType.PRIVATE))  # fmt: skip

    async def board(self, lane: Lane, text: str | None) -> None:
        chat = lane.key.partition(":")[2]
        delivery = {"chat_id": chat}
        shown = self._boards.get(lane.key)
        if text is None:
            if shown is not None:
                del self._boards[lane.key]
                await self._delete(None, delivery, shown[0])
            return
        if shown is not None:
            if shown[1] == text:
                return
            try:
                await self._call(None, delivery, self.bot.edit_message_text, message_id=shown[0], text=text)
                self._boards[lane.key] = (shown[0], text)
                return
            except UnreachableError as err:
                if "not modified" in str(err).lower():
                    return
                _log.info("lane %s: the board could not be edited (%s); posting a new one", lane.key, err)
        sent = await self._call(None, delivery, self.bot.send_message, text=text)
        self._boards[lane.key] = (sent.message_id, text)

    # ------------------------------------------------------------------ results

    async def _photo(self, image: SavedImage) -> UploadFile | None:
        """What to send as the photo: the core's JPEG preview, else the PNG if it fits; None: neither."""
        if image.photo is not None and len(image.photo.data) <= self.photo_limit:
            return image.photo
        if image.size_bytes <= self.photo_limit:
            return await self.service.upload_file(image.path, self.photo_limit)
        return None

    async def _single(self, job: Job, image: SavedImage, caption: str) -> Message:
        markup = result_markup(job.id, vary=self.service.draws_from_pictures)
        photo = await self._photo(image)
        if photo is not None:
            try:
                return await self.bot.send_photo(
                    chat_id=self._chat(job), photo=photo.data, filename=photo.filename, caption=caption,
                    reply_markup=markup, **where(job.delivery),
                )  # fmt: skip
            except TelegramError as err:
                if not photo_rejected(err):
                    raise core_error(err) from None
                _log.info("job %s: Telegram refused the photo (%s); sending a document", job.id, err.message)
        document = await self.service.upload_file(image.path, self.document_limit)
        return await self._call(job, job.delivery, self.bot.send_document, document=document.data,
                                filename=document.filename, caption=caption, reply_markup=markup,
                                **where(job.delivery))  # fmt: skip

    def _chat(self, job: Job) -> int:
        chat = chat_id_of(job.delivery)
        if chat is None:
            raise UnreachableError("the job has no Telegram chat to reply to")
        return chat

    async def _album(self, job: Job, images: Sequence[SavedImage], caption: str) -> list[Message]:
        found = [await self._photo(i) for i in images]
        files = [f for f in found if f is not None]
        if len(files) == len(images):
            photos = [
                InputMediaPhoto(f.data, caption=caption if n == 0 else None, filename=f.filename)
                for n, f in enumerate(files)
            ]
            try:
                return list(
                    await self.bot.send_media_group(
                        chat_id=self._chat(job), media=photos, **where(job.delivery)
                    )
                )
            except TelegramError as err:
                if not photo_rejected(err):
                    raise core_error(err) from None
                _log.info("job %s: Telegram refused the photos (%s); sending documents", job.id, err.message)
        files = [await self.service.upload_file(i.path, self.document_limit) for i in images]
        documents = [
            InputMediaDocument(f.data, caption=caption if n == len(files) - 1 else None, filename=f.filename)
            for n, f in enumerate(files)
        ]
        return list(await self._call(job, job.delivery, self.bot.send_media_group, media=documents,
                                     **where(job.delivery)))  # fmt: skip

    async def _album_keyboard(self, job: Job, first: Message, count: int) -> int:
        """An album cannot carry buttons: the status message becomes the keyboard (or a new one)."""
        text = messages.album_keyboard_text(job, count)
        markup = result_markup(job.id, vary=self.service.draws_from_pictures)
        status = self._status_id(job)
        if status is not None and await self._edit(job, status, text, markup):
            return status
        sent = await self._call(job, job.delivery, self.bot.send_message, text=text, reply_markup=markup,
                                reply_parameters=ReplyParameters(message_id=first.message_id,
                                                                 allow_sending_without_reply=True))  # fmt: skip
        return sent.message_id


__all__ = ["PLATFORM", "TelegramTransport", "chat_id_of", "where"]

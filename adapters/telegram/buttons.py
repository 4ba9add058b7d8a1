"""Telegram buttons: payloads that carry only the job id, the keyboards, and what a press does."""

from __future__ import annotations

import asyncio
import logging
import os

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, InputMediaDocument, ReplyParameters, Update
from telegram.constants import ChatType
from telegram.error import BadRequest
from telegram.ext import ContextTypes, ExtBot

from adapters.telegram.delivery import PLATFORM, delivery_of, display_name, user_ref
from adapters.telegram.errors import answer_press
from bot import messages
from bot.domain import VARY_STRONG, VARY_SUBTLE, Job, JobState, UploadFile
from bot.errors import NotFoundError, RequestError
from bot.service import Service

_log = logging.getLogger(__name__)

#: callback data is ``bb:<action>:<job id>``, far below Telegram's 64 bytes
CALLBACK_PREFIX = "bb"
_ACTIONS = ("reroll", "png", "del", "cancel", "subtle", "strong")
#: the strengths of the two Vary buttons
VARY_STRENGTHS = {"subtle": VARY_SUBTLE, "strong": VARY_STRONG}


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
        [[InlineKeyboardButton(messages.BUTTONS["cancel"], callback_data=callback_data("cancel", job_id))]]
    )


def result_markup(job_id: str, *, vary: bool = True) -> InlineKeyboardMarkup:
    """The keyboard under a delivered result; the Vary row only when the model draws from pictures."""
    rows = [
        [
            InlineKeyboardButton(messages.BUTTONS["reroll"], callback_data=callback_data("reroll", job_id)),
            InlineKeyboardButton(messages.BUTTONS["png"], callback_data=callback_data("png", job_id)),
            InlineKeyboardButton(messages.BUTTONS["delete"], callback_data=callback_data("del", job_id)),
        ],
    ]
    if vary:
        rows.append(
            [
                InlineKeyboardButton(messages.BUTTONS[action], callback_data=callback_data(action, job_id))
                for action in VARY_STRENGTHS
            ]
        )
    return InlineKeyboardMarkup(rows)


class Buttons:
    """Handles presses of our buttons; the job is always read from the service."""

    def __init__(self, service: Service, document_limit: int) -> None:
        self._service = service
        self._document_limit = document_limit

    async def __call__(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query, user = update.callback_query, update.effective_user
        assert query is not None and user is not None
        parsed = parse_callback(query.data)
        if parsed is None or query.message is None:
            await answer_press(query)
            return
        action, job_id = parsed
        actor = user_ref(user)
        message = query.message
        chat = message.chat
        service = self._service
        # a payload is only honoured under a message of the job's own chat: a forged one naming
        # a job of another chat (its id seen in a caption or /jobs) must not reveal or redraw it
        if str((await service.job(job_id)).delivery.get("chat_id")) != str(chat.id):
            await answer_press(query, messages.NOT_THIS_CHAT, show_alert=True)
            return
        if action == "reroll":
            ticket = await service.reroll(
                actor, job_id, delivery=delivery_of(message), user_name=display_name(user),
                nsfw_allowed=chat.type == ChatType.PRIVATE,
            )  # fmt: skip
            await answer_press(query, messages.rerolling_text(ticket.job))
        elif action in VARY_STRENGTHS:
            ticket = await service.vary(
                actor, job_id, VARY_STRENGTHS[action], delivery=delivery_of(message),
                user_name=display_name(user), nsfw_allowed=chat.type == ChatType.PRIVATE,
            )  # fmt: skip
            await answer_press(query, messages.varying_text(ticket.job))
        elif action == "png":
            job = await service.job(job_id)
            await self._check_originals(job)
            await answer_press(query, messages.PNG_SENT)  # before the files are read and fitted
            files = [await service.upload_file(p, self._document_limit) for p in job.outputs]
            sending = service.status.carry(
                PLATFORM, delivery_of(message),
                lambda: self._send_originals(context.bot, job, files, chat.id, message.message_id),
                cost=len(files),
            )  # fmt: skip
            if sending is not None:
                await sending
        elif action == "del":
            job = await service.authorize_delete(actor, job_id)
            await self._delete_results(context.bot, job, chat.id, message.message_id)
            await answer_press(query, messages.DELETED)
        else:
            job = await service.cancel(actor, job_id)
            await answer_press(
                query, messages.CANCELLED if job.state is JobState.CANCELLED else messages.STOPPING
            )

    @staticmethod
    async def _check_originals(job: Job) -> None:
        """The untouched PNG(s) are still there to send (so the ``parameters`` metadata survives)."""
        if not job.outputs:
            raise RequestError(messages.no_images_yet(job))
        exists = await asyncio.to_thread(lambda: [os.path.exists(p) for p in job.outputs])
        if not all(exists):
            raise NotFoundError(messages.originals_gone(job))

    @staticmethod
    async def _send_originals(
        bot: ExtBot[None], job: Job, files: list[UploadFile], chat_id: int, reply_to: int
    ) -> None:
        where = ReplyParameters(message_id=reply_to, allow_sending_without_reply=True)
        if len(files) == 1:
            await bot.send_document(chat_id, files[0].data, filename=files[0].filename,
                                    caption=messages.original_caption(job), reply_parameters=where)  # fmt: skip
            return
        for start in range(0, len(files), 10):
            chunk = files[start : start + 10]
            if len(chunk) == 1:
                await bot.send_document(
                    chat_id, chunk[0].data, filename=chunk[0].filename, reply_parameters=where
                )
            else:
                media = [InputMediaDocument(f.data, filename=f.filename) for f in chunk]
                await bot.send_media_group(chat_id, media, reply_parameters=where)

    @staticmethod
    async def _delete_results(bot: ExtBot[None], job: Job, chat_id: int, pressed: int) -> None:
        ids = {int(i) for i in job.delivery.get("result_message_ids", []) if str(i).isdigit()}
        ids.add(pressed)
        try:
            await bot.delete_messages(chat_id, sorted(ids))
        except BadRequest as err:
            _log.info("job %s: some result messages were already gone: %s", job.id, err.message)

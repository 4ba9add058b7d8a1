"""Pictures people draw from on Telegram: a photo or image file with a ``/draw`` caption, or a
``/draw`` sent as a reply to one (someone's picture or the bot's own result).

Only Telegram file ids are fetched, never a URL from the text. The size Telegram declares is
checked before anything is downloaded, and the bytes again after; the format is told from the
bytes by the core (``bot.inputs``), so a text file named ``.png`` is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from telegram import Message
from telegram.ext import ExtBot

from adapters.telegram.buttons import parse_callback
from bot.inputs import check_picture, check_size

#: seconds a download may take before the request is refused
DOWNLOAD_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Attached:
    """A picture in a message: a Telegram file to fetch, or one of our results by job id."""

    file_id: str | None = None
    size: int | None = None
    job_id: str | None = None


def result_job(message: Message, bot_id: int) -> str | None:
    """The job id of one of our results, read from its buttons (they carry only the job id)."""
    if message.from_user is None or message.from_user.id != bot_id or message.reply_markup is None:
        return None
    for row in message.reply_markup.inline_keyboard:
        for button in row:
            data = button.callback_data if isinstance(button.callback_data, str) else None
            parsed = parse_callback(data)
            if parsed is not None:
                return parsed[1]
    return None


def attached(message: Message, bot_id: int) -> Attached | None:
    """The picture a message carries, or None. Our own results come back as their lossless PNG."""
    job_id = result_job(message, bot_id)
    if job_id is not None and (message.photo or message.document):
        return Attached(job_id=job_id)
    if message.photo:
        largest = message.photo[-1]  # Telegram lists the sizes smallest first
        return Attached(file_id=largest.file_id, size=largest.file_size)
    if message.document is not None:
        return Attached(file_id=message.document.file_id, size=message.document.file_size)
    return None


def picture_of(message: Message, bot_id: int) -> Attached | None:
    """The picture a ``/draw`` draws from: its own attachment, else the replied message's."""
    own = attached(message, bot_id)
    if own is not None:
        return own
    if message.reply_to_message is not None:
        return attached(message.reply_to_message, bot_id)
    return None


async def download(bot: ExtBot[None], picture: Attached, limit: int) -> bytes:
    """The bytes of a Telegram file, refused in one line when over ``limit`` or not a picture."""
    assert picture.file_id is not None
    if picture.size is not None:
        check_size(picture.size, limit)
    file = await bot.get_file(picture.file_id, read_timeout=DOWNLOAD_TIMEOUT)
    if file.file_size is not None:
        check_size(file.file_size, limit)
    data = bytes(await file.download_as_bytearray(read_timeout=DOWNLOAD_TIMEOUT))
    check_picture(data, limit)
    return data

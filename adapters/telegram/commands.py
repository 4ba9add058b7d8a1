"""Telegram commands for everyone: /draw, /credits, /jobs, /queue, /cancel, /help, /start.

Each handler turns the update into a core call and hands the core's text back to the chat
through the status engine, so an answer in a busy group waits its turn in that group's budget.
"""

from __future__ import annotations

from telegram import Message, MessageEntity, Update
from telegram.constants import ChatType
from telegram.ext import ContextTypes

from adapters.telegram.delivery import PLATFORM, delivery_of, display_name, user_ref
from adapters.telegram.pictures import download, picture_of
from bot import messages
from bot.grammar import split_flags
from bot.service import Service

PUBLIC_COMMANDS = messages.COMMAND_MENU

_Context = ContextTypes.DEFAULT_TYPE


def command_text(message: Message) -> str:
    """The raw text (or a photo's caption) after the leading ``/command[@bot]``, flags and spacing kept."""
    text = message.text or message.caption or ""
    entities = message.entities or message.caption_entities
    entity = entities[0] if entities else None
    if entity is None or entity.type != MessageEntity.BOT_COMMAND or entity.offset != 0:
        return text
    # entity offsets count UTF-16 units; the command itself is ASCII, so this is exact
    return text[entity.length :].strip()


def replied_prompt(message: Message, bot_id: int) -> str:
    """The prompt a ``/draw`` reply borrows: the replied message's text or caption."""
    replied = message.reply_to_message
    if replied is None:
        return ""
    text = (replied.text or replied.caption or "").strip()
    if replied.from_user is not None and replied.from_user.id == bot_id:
        text = text.splitlines()[0] if text else ""  # our caption: the prompt is the first line
    if text.startswith("/"):
        first, _, rest = text.partition(" ")
        text = rest.strip() if first.split("@")[0].lower() == "/draw" else text
    return text


class Commands:
    """The public commands; ``answer`` sends a core text back to the command's chat."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def answer(self, update: Update, text: str) -> None:
        message = update.effective_message
        if message is not None:
            self.service.status.say(PLATFORM, delivery_of(message), text)

    async def draw(self, update: Update, context: _Context) -> None:
        """``/draw``: from text, from the photo it is the caption of, or from the photo it replies to."""
        message, user = update.effective_message, update.effective_user
        assert message is not None and user is not None
        service, bot = self.service, context.bot
        text = command_text(message)
        picture = picture_of(message, bot.id)
        if message.reply_to_message is not None and not split_flags(text).prompt.strip():
            borrowed = replied_prompt(message, bot.id)
            if picture is not None and picture.job_id is not None:  # our result: its whole prompt
                borrowed = (await service.job(picture.job_id)).request.prompt
            text = f"{borrowed} {text}".strip()
        who = user_ref(user)
        delivery, name = delivery_of(message), display_name(user)
        # Telegram has no NSFW marker for groups: NSFW_WORDS are allowed in private chats only.
        nsfw = message.chat.type == ChatType.PRIVATE
        if picture is None:
            request = service.parse(text)
            await service.submit(who, request, delivery=delivery, user_name=name, nsfw_allowed=nsfw)
            return
        job_id, limit = picture.job_id, service.settings.max_input_bytes

        async def fetch() -> bytes:
            if job_id is not None:
                return await service.result_picture(job_id)
            return await download(bot, picture, limit)

        await service.submit_picture(who, text, fetch, delivery=delivery, user_name=name, nsfw_allowed=nsfw)

    async def credits(self, update: Update, context: _Context) -> None:
        assert update.effective_user is not None
        balance = await self.service.credits(user_ref(update.effective_user))
        self.answer(update, messages.balance_text(balance, self.service.next_refill_text()))

    async def jobs(self, update: Update, context: _Context) -> None:
        assert update.effective_user is not None
        entries = await self.service.my_jobs(user_ref(update.effective_user))
        self.answer(update, messages.jobs_text(entries))

    async def queue(self, update: Update, context: _Context) -> None:
        self.answer(update, messages.queue_text(self.service.queue_view()))

    async def cancel(self, update: Update, context: _Context) -> None:
        assert update.effective_user is not None
        job_id = context.args[0] if context.args else None
        job = await self.service.cancel(user_ref(update.effective_user), job_id)
        self.answer(update, messages.cancel_text(job))

    async def help(self, update: Update, context: _Context) -> None:
        user = update.effective_user
        admin = user is not None and self.service.is_admin(user_ref(user))
        self.answer(update, messages.help_text(PLATFORM, admin=admin))

    async def start(self, update: Update, context: _Context) -> None:
        self.answer(update, f"{messages.START}\n\n{messages.help_text(PLATFORM, admin=False)}")

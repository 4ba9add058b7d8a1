"""Telegram chat references: what a job (or an answer) keeps to reply after a restart."""

from __future__ import annotations

from typing import Any

from telegram import MaybeInaccessibleMessage, Message
from telegram import User as TgUser

from bot.domain import UserRef

PLATFORM = "telegram"


def user_ref(user: TgUser) -> UserRef:
    """The core's reference to a Telegram user."""
    return UserRef(platform=PLATFORM, id=str(user.id))


def display_name(user: TgUser) -> str:
    """The name stored for a user: the username without ``@`` (so ``/quota show @name`` finds it
    and listings do not ping anyone), else the full name."""
    return str(user.username) if user.username else str(user.full_name)


def delivery_of(message: MaybeInaccessibleMessage) -> dict[str, Any]:
    """The JSON-able chat reference a job carries, enough to reply after a restart.

    A button's message may be too old for Telegram to include (inaccessible): then the job
    goes to the chat without a topic.
    """
    chat = message.chat
    delivery: dict[str, Any] = {
        "chat_id": chat.id,
        "chat_type": str(chat.type),
        "message_id": message.message_id,
    }
    if isinstance(message, Message) and message.is_topic_message and message.message_thread_id is not None:
        delivery["thread_id"] = message.message_thread_id
    return delivery

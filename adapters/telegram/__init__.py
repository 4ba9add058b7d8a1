"""brushbot on Telegram (python-telegram-bot 22): ``TelegramAdapter`` and what tests and tools need.

Modules: ``app`` (lifecycle), ``commands`` and ``admin`` (handlers), ``buttons`` (payloads,
keyboards, presses), ``transport`` (carrying the core's messages), ``delivery`` (chat
references), ``errors`` (Bot API errors and the error hook).
"""

from adapters.telegram.app import TelegramAdapter, Webhook
from adapters.telegram.buttons import callback_data, parse_callback
from adapters.telegram.delivery import PLATFORM
from adapters.telegram.transport import TelegramTransport

__all__ = ["PLATFORM", "TelegramAdapter", "TelegramTransport", "Webhook", "callback_data", "parse_callback"]

"""brushbot on Discord (discord.py 2): ``DiscordAdapter`` and what tests and tools need.

Modules: ``app`` (lifecycle), ``commands`` and ``admin`` (slash commands), ``buttons``
(persistent buttons and the Edit form), ``pictures`` (drawing from an attachment or a
message's picture), ``transport`` (carrying the core's messages within
learned buckets), ``delivery`` (chat references and lanes), ``errors`` (token redaction,
Discord errors, the error hook).
"""

from adapters.discord.app import DiscordAdapter
from adapters.discord.delivery import PLATFORM
from adapters.discord.errors import FIELD_TOKEN, REDACTED_LOGGERS, URL_TOKEN
from adapters.discord.transport import DiscordTransport

__all__ = ["FIELD_TOKEN", "PLATFORM", "REDACTED_LOGGERS", "URL_TOKEN", "DiscordAdapter", "DiscordTransport"]

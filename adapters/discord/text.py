"""What the bot writes on Discord is inert: user text cannot format, link, unfurl or mention.

The core's texts use no markdown, so a whole line is escaped at the edge, user words and all:
``[text](url)`` shows as typed instead of a masked link under the bot's name, ``**``, ``__``,
``||``, backticks, headings and quotes stay characters, and ``@everyone`` or ``<@id>`` show as
text. A bare link keeps working but is wrapped in ``<…>``, so Discord shows no preview of it.
(Mentions are also off at the client: only a requester is ever pinged, on purpose.)
"""

from __future__ import annotations

import re

import discord

#: links Discord would turn into a preview; kept clickable, wrapped so they do not unfurl
_LINK = re.compile(r"<?(https?://[^\s<>()]+)>?", re.IGNORECASE)
#: line starts Discord reads as a heading, a quote or a list, and masked-link brackets
_LINE_START = re.compile(r"^(\s*)(#{1,3} |-# |>{1,3} |[-*+] |\d+\. )", re.MULTILINE)


def inert(text: str) -> str:
    """``text`` as Discord will show it literally (see the module docstring)."""
    out: list[str] = []
    last = 0
    for link in _LINK.finditer(text):
        out.append(_escape(text[last : link.start()]))
        out.append(f"<{link.group(1)}>")
        last = link.end()
    out.append(_escape(text[last:]))
    return "".join(out)


def _escape(part: str) -> str:
    part = discord.utils.escape_mentions(discord.utils.escape_markdown(part, as_needed=False))
    part = part.replace("[", "\\[").replace("]", "\\]").replace("<", "\\<")
    return _LINE_START.sub(lambda m: f"{m.group(1)}\\{m.group(2)}", part)

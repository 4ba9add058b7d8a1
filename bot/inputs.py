"""The rules for a picture a user gives: how big, which formats, how many pixels.

Pictures are untrusted input. The core checks what it can without decoding (the byte
count, declared or read, and the format from the file's first bytes, never its name); the
generation side decodes with Pillow and asks ``check_pixels`` about the header's size before
it decodes a single pixel, so a decompression bomb is refused cheaply. Every refusal is one
``RequestError`` line, raised before anything is queued or charged.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable
from pathlib import Path

from bot.errors import RequestError

#: the formats drawn from, by the magic bytes they start with
ACCEPTED = ("png", "jpeg", "webp")
_ACCEPTED_TEXT = "PNG, JPEG or WebP"
#: enough of the head of a file to tell every format below apart
HEAD_BYTES = 16

# formats people send that are pictures but not ones we draw from: named, so the refusal is clear
_REFUSED: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"%PDF", "PDF"),
)


def _mb(n: int) -> str:
    return f"{n / 1_000_000:.1f} MB"


def sniff_format(head: bytes) -> str | None:
    """``png``, ``jpeg`` or ``webp`` from a file's first bytes; None for anything else."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def check_size(size_bytes: int, limit: int) -> None:
    """Refuse a picture over ``limit`` bytes (``MAX_INPUT_BYTES``), before or after it is fetched.

    Adapters call it with the size the platform declares, before downloading anything.
    """
    if size_bytes > limit:
        raise RequestError(f"the picture is {_mb(size_bytes)}; the limit is {_mb(limit)}")
    if size_bytes <= 0:
        raise RequestError("the picture is empty")


def check_format(head: bytes) -> str:
    """The accepted format of a file from its first bytes, or one line saying why it is refused."""
    found = sniff_format(head)
    if found is not None:
        return found
    for magic, name in _REFUSED:
        if head.startswith(magic):
            raise RequestError(f"{name} pictures are not supported: send a {_ACCEPTED_TEXT}")
    if len(head) >= 12 and head[4:8] == b"ftyp":
        raise RequestError(f"HEIC/AVIF pictures are not supported: send a {_ACCEPTED_TEXT}")
    raise RequestError(f"that file is not a picture: send a {_ACCEPTED_TEXT}")


def check_picture(data: bytes, limit: int) -> str:
    """Check a fetched picture's size and format (``png``, ``jpeg`` or ``webp``); returns the format."""
    check_size(len(data), limit)
    return check_format(data[:HEAD_BYTES])


def check_pixels(width: int, height: int, limit: int) -> None:
    """Refuse a picture whose header declares more than ``limit`` pixels (``MAX_INPUT_PIXELS``)."""
    if width <= 0 or height <= 0:
        raise RequestError("the picture has no pixels")
    if width * height > limit:
        raise RequestError(
            f"the picture is {width}x{height} ({width * height / 1e6:.0f} megapixels); "
            f"the limit is {limit / 1e6:g} megapixels"
        )


async def read_limited(chunks: AsyncIterable[bytes], limit: int) -> bytes:
    """Collect a download's chunks, stopping as soon as it passes ``limit`` bytes.

    For downloads whose declared size cannot be trusted: at most ``limit`` bytes (plus one
    chunk) are ever held.
    """
    parts: list[bytes] = []
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise RequestError(f"the picture is over the limit of {_mb(limit)}")
        parts.append(chunk)
    data = b"".join(parts)
    check_size(len(data), limit)
    return data


def read_picture_file(path: str | Path, limit: int) -> bytes:
    """A local picture's bytes (the console and the command line): its size checked before reading.

    Blocking: call it off the event loop.
    """
    file = Path(path).expanduser()
    try:
        size = file.stat().st_size
        check_size(size, limit)
        with file.open("rb") as handle:
            data = handle.read(limit + 1)  # never more than the limit, even if the file grew
    except FileNotFoundError:
        raise RequestError(f"there is no file {str(path)[:80]}") from None
    except IsADirectoryError:
        raise RequestError(f"{str(path)[:80]} is a folder, not a picture") from None
    except OSError as exc:
        raise RequestError(f"cannot read {str(path)[:80]}: {exc.strerror or exc}") from None
    check_picture(data, limit)
    return data


_IMAGE_FLAG = re.compile(r'(?:(?<=\s)|^)--image\s+("([^"]+)"|(\S+))')


def take_image_flag(text: str) -> tuple[str, str | None]:
    """Split ``--image PATH`` (or ``--image "a path"``) out of a console ``/draw`` line."""
    matches = list(_IMAGE_FLAG.finditer(text))
    if not matches:
        if re.search(r"(?:(?<=\s)|^)--image\s*$", text):
            raise RequestError("--image needs the path of a picture")
        return text, None
    if len(matches) > 1:
        raise RequestError("--image is given twice")
    match = matches[0]
    rest = (text[: match.start()] + text[match.end() :]).strip()
    return rest, match.group(2) or match.group(3)

"""Saving images as PNG with A1111-style metadata, reading it back, and fitting uploads to a limit."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from bot.domain import DrawRequest, Job, SavedImage, UploadFile
from bot.errors import DeliveryError
from bot.ports import Rendered

_log = logging.getLogger(__name__)

#: the PNG text chunk A1111, ComfyUI importers and most image viewers read
PARAMETERS_KEY = "parameters"
#: our own JSON chunk: every field, exactly, for the Info button and re-runs
JSON_KEY = "brushbot"
#: re-encoding ladder for uploads over the limit: high quality first
QUALITIES = (92, 85, 78, 70)
#: the PNG's deflate setting: run-length matching only. Measured on 2 cores, it is as small as
#: Pillow's default (level 6) on drawn images and noise alike, and 1.6x (512²) to 3x (1024²) faster
PNG_OPTIONS: dict[str, Any] = {"compress_level": 1, "compress_type": zlib.Z_RLE}
#: the chat preview, for platforms that recompress photos anyway: about 1.5 ms at 512²
PHOTO_QUALITY = 92

_UNSAFE = re.compile(r"[^A-Za-z0-9-]+")
# one "Key: value" pair of the settings line; values with commas are JSON-quoted
_PAIR = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt: "


def format_parameters(
    request: DrawRequest, *, seed: int, width: int, height: int, model: str, sampler: str
) -> str:
    """The A1111 ``parameters`` text: prompt, negative prompt line, then one settings line.

    A request from a picture adds A1111's ``Denoising strength`` and ``Source hash`` (the
    first 10 hex digits of the kept picture's sha256, as A1111 shortens its model hash).
    """
    pairs = {
        "Steps": str(request.steps),
        "Sampler": sampler,
        "CFG scale": _number(request.guidance),
        "Seed": str(seed),
        "Size": f"{width}x{height}",
        "Model": model,
    }
    if request.strength is not None and request.source is not None:
        pairs["Denoising strength"] = f"{request.strength:g}"
        pairs["Source hash"] = request.source[:10]
    settings = ", ".join(f"{k}: {_quote(v)}" for k, v in pairs.items())
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(_NEGATIVE + request.negative_prompt)
    lines.append(settings)
    return "\n".join(lines)


def _number(value: float) -> str:
    """A1111 style: ``7.0``, ``3.5``, ``0.0``."""
    return f"{value:.1f}" if value == int(value) else f"{value:g}"


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',:"\n') else value


def parse_parameters(text: str) -> dict[str, Any]:
    """Parse A1111 ``parameters`` text into prompt, negative_prompt and the settings as strings.

    Settings keys are lower-cased with underscores (``steps``, ``cfg_scale``, ``seed``, ...).
    """
    lines = text.split("\n")
    settings_line = lines[-1] if len(lines) > 1 and _PAIR.match(lines[-1]) else ""
    body = lines[:-1] if settings_line else lines
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in body:
        if negative_lines or line.startswith(_NEGATIVE):
            negative_lines.append(line.removeprefix(_NEGATIVE) if not negative_lines else line)
        else:
            prompt_lines.append(line)
    result: dict[str, Any] = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines)}
    for key, value in _PAIR.findall(settings_line):
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        result[key.strip().lower().replace(" ", "_")] = value.strip() if isinstance(value, str) else value
    return result


def read_parameters(path: str | Path) -> dict[str, Any]:
    """Read an image's metadata back: the parsed ``parameters`` plus ``brushbot`` (the JSON chunk).

    ``parameters`` holds the raw text. Missing chunks give an empty dict / no keys.
    """
    with Image.open(path) as img:
        text_chunks = dict(getattr(img, "text", {}) or {})
    result: dict[str, Any] = {}
    raw = text_chunks.get(PARAMETERS_KEY)
    if raw:
        result.update(parse_parameters(raw))
        result[PARAMETERS_KEY] = raw
    data = text_chunks.get(JSON_KEY)
    if data:
        try:
            result[JSON_KEY] = json.loads(data)
        except ValueError:
            _log.warning("unreadable %s chunk in %s", JSON_KEY, path)
    return result


@dataclass(frozen=True, slots=True, kw_only=True)
class EncodedImage:
    """A PNG encoded where it was drawn (a Ray worker), without metadata: the front end adds it."""

    png: bytes
    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height


def encode_png(image: Any) -> EncodedImage:
    """A PIL image as PNG bytes (blocking: run it off the GPU thread)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return EncodedImage(png=buffer.getvalue(), width=image.size[0], height=image.size[1])


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _with_chunks(png: bytes, info: PngInfo) -> bytes:
    """``png`` with ``info``'s text chunks put right after its header, without decoding it."""
    if not png.startswith(_PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    header_end = 8 + 8 + struct.unpack(">I", png[8:12])[0] + 4
    chunks = b"".join(
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        for kind, data, *_ in info.chunks  # type: ignore[attr-defined]
    )
    return png[:header_end] + chunks + png[header_end:]


def _human(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f} MB"
    if n >= 1_000:
        return f"{n / 1_000:.0f} KB"
    return f"{n} bytes"


class ImageStore:
    """A ``bot.ports.ImageSink`` writing PNGs under ``output_dir/YYYY-MM-DD/``.

    Each image is encoded once as a lossless PNG with its metadata (fast deflate settings) and,
    when ``photos`` is on, once as a JPEG chat preview kept in memory (``SavedImage.photo``).
    Blocking (encoding): call it off the event loop and off the GPU thread.
    ``clock`` gives the time used in folder and file names.
    """

    def __init__(
        self,
        output_dir: str | Path,
        model_name: str,
        *,
        sampler: str = "FlowMatchEuler",
        clock: Callable[[], float] = time.time,
        photos: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.model_name = model_name
        self.sampler = sampler
        self.photos = photos
        self._clock = clock

    def save(self, job: Job, rendered: Rendered) -> list[SavedImage]:
        """Write one PNG per image with its metadata, make its chat preview; return them in order."""
        now = datetime.fromtimestamp(self._clock())
        folder = self.output_dir / now.strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        job_part = _UNSAFE.sub("_", job.id) or "job"
        saved: list[SavedImage] = []
        for index, (image, seed) in enumerate(zip(rendered.images, rendered.seeds, strict=True)):
            width, height = image.size
            path = folder / f"{now:%Y%m%d-%H%M%S}_{job_part}_{index}_{seed}.png"
            info = PngInfo()
            info.add_text(
                PARAMETERS_KEY,
                format_parameters(
                    job.request,
                    seed=seed,
                    width=width,
                    height=height,
                    model=self.model_name,
                    sampler=self.sampler,
                ),
            )
            info.add_itxt(JSON_KEY, json.dumps(self._record(job, seed, width, height), ensure_ascii=False))
            # write beside, then rename: a reader never sees half a PNG
            partial = path.with_name(f".{path.name}.partial")
            try:
                if isinstance(image, EncodedImage):
                    partial.write_bytes(_with_chunks(image.png, info))
                else:
                    image.save(partial, format="PNG", pnginfo=info, **PNG_OPTIONS)
                os.replace(partial, path)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            saved.append(
                SavedImage(
                    path=str(path),
                    seed=seed,
                    width=width,
                    height=height,
                    size_bytes=path.stat().st_size,
                    photo=self.photo(image, path.with_suffix(".jpg").name) if self.photos else None,
                )
            )
        return saved

    @staticmethod
    def photo(image: Image.Image | EncodedImage, filename: str) -> UploadFile:
        """A high-quality JPEG of ``image`` for a chat photo (the platform recompresses it anyway)."""
        if isinstance(image, EncodedImage):
            # drawn on a Ray worker: decoded here for the JPEG (the worker could send one too)
            image = Image.open(io.BytesIO(image.png))
        buf = io.BytesIO()
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        rgb.save(buf, format="JPEG", quality=PHOTO_QUALITY)
        return UploadFile(data=buf.getvalue(), filename=filename, mime="image/jpeg", format="jpeg")

    def _record(self, job: Job, seed: int, width: int, height: int) -> dict[str, Any]:
        request = job.request
        return {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "steps": request.steps,
            "guidance": request.guidance,
            "seed": seed,
            "width": width,
            "height": height,
            "model": self.model_name,
            "sampler": self.sampler,
            "job_id": job.id,
            # image-to-image: the strength and the full sha256 of the picture it started from
            **({"strength": request.strength, "source": request.source} if request.source else {}),
        }

    def fit(self, path: str, limit_bytes: int) -> UploadFile:
        """The PNG unchanged when it fits ``limit_bytes``, else a JPEG or WebP that does.

        Tries JPEG then WebP at quality 92, 85, 78 and 70; raises ``DeliveryError`` when
        even the smallest is too large.
        """
        source = Path(path)
        try:
            data = source.read_bytes()
        except OSError:
            raise DeliveryError("The image file is missing; it cannot be sent.") from None
        if len(data) <= limit_bytes:
            return UploadFile(data=data, filename=source.name, mime="image/png", format="png")
        with Image.open(io.BytesIO(data)) as img:
            comment = str((getattr(img, "text", {}) or {}).get(PARAMETERS_KEY, ""))
            rgb = img.convert("RGB")
        for quality in QUALITIES:
            for fmt, suffix, mime in (("JPEG", ".jpg", "image/jpeg"), ("WEBP", ".webp", "image/webp")):
                buf = io.BytesIO()
                options: dict[str, Any] = {"quality": quality}
                if fmt == "JPEG":
                    # keeps the prompt and seed readable in the JPEG (a COM segment)
                    options.update(optimize=True, comment=comment.encode("utf-8"))
                else:
                    options.update(method=4)
                rgb.save(buf, format=fmt, **options)
                if buf.tell() <= limit_bytes:
                    _log.info(
                        "%s: %s over the %s limit, sent as %s q%d (%s)",
                        source.name, _human(len(data)), _human(limit_bytes), fmt, quality, _human(buf.tell()),
                    )  # fmt: skip
                    return UploadFile(
                        data=buf.getvalue(),
                        filename=source.with_suffix(suffix).name,
                        mime=mime,
                        format=fmt.lower(),
                    )
        raise DeliveryError(
            f"The image is too large to upload here, even compressed (limit {_human(limit_bytes)})."
        )

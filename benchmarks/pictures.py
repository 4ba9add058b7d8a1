"""What a picture to draw from costs before the GPU sees it: checking, decoding, keeping, refusing.

Prints the median of a few runs for a phone-sized JPEG (decode with EXIF orientation, scale to
twice the largest output, PNG at zlib level 1, sha256), the same kept whole at zlib's default
level (what it would cost without scaling), and the refusal of headers declaring 81 and 400
megapixels (no pixel decoded). CPU only; run ``python benchmarks/pictures.py``.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# runnable as a plain script from anywhere: make the repository root importable
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image

from bot.config import Settings
from bot.errors import RequestError
from generation.sources import SourceStore, decode_picture
from tests.support import png_header_only


def photo_jpeg(width: int, height: int) -> bytes:
    """A photo-like JPEG: smooth gradients and mild noise (pure noise would exaggerate PNG sizes)."""
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, width)[None, :]
    y = np.linspace(0, 255, height)[:, None]
    planes = [
        np.broadcast_to(x, (height, width)),
        np.broadcast_to(y, (height, width)),
        np.full((height, width), 120.0),
    ]
    pixels = np.clip(np.stack(planes, 2) + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def refuse(data: bytes, max_pixels: int) -> None:
    try:
        decode_picture(data, max_pixels=max_pixels)
    except RequestError:
        return
    raise AssertionError("the header was not refused")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4032)
    parser.add_argument("--height", type=int, default=3024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    keep_pixels = 2 * settings.max_pixels
    data = photo_jpeg(args.width, args.height)
    print(f"python {platform.python_version()}, {platform.machine()}, Pillow {Image.__version__}")
    print(
        f"input: {args.width}x{args.height} JPEG, {len(data) / 1e6:.1f} MB; kept at most {keep_pixels:,} pixels"
    )
    with tempfile.TemporaryDirectory() as folder:
        store = SourceStore(folder)
        rows = [
            ("decode (EXIF, RGB, no metadata)",
             median_seconds(lambda: decode_picture(data, max_pixels=settings.max_input_pixels), args.repeat)),
            ("keep: decode + scale + PNG level 1 + sha256",
             median_seconds(lambda: store.keep(data, max_pixels=settings.max_input_pixels, keep_pixels=keep_pixels),
                            args.repeat)),
        ]  # fmt: skip
        image, _ = decode_picture(data, max_pixels=settings.max_input_pixels)
        rows.append(("for comparison: whole picture, PNG default level",
                     median_seconds(lambda: image.save(io.BytesIO(), "PNG"), 1)))  # fmt: skip
        kept = sorted(Path(folder, "sources").glob("*.png"))
        size = kept[0].stat().st_size if kept else 0
    for header in (9000, 20000):
        bomb = png_header_only(header, header)
        rows.append((f"refuse a {header}x{header} PNG header ({len(bomb)} bytes)",
                     median_seconds(lambda bomb=bomb: refuse(bomb, settings.max_input_pixels), 20)))  # fmt: skip
    for what, seconds in rows:
        shown = f"{seconds * 1000:9.1f} ms" if seconds >= 0.001 else f"{seconds * 1e6:9.1f} µs"
        print(f"{what:<52} {shown}")
    print(f"kept file: {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

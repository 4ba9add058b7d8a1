"""CPU milliseconds per image spent encoding: the old PNG setting against the chat path's one pass.

"before" is what ``ImageStore.save`` did until the fast path: a PNG at Pillow's default deflate
(level 6), which the Telegram photo then uploaded as it was. "after" is ``ImageStore.save`` now:
the PNG with ``PNG_OPTIONS`` plus the JPEG chat preview (``SavedImage.photo``). Images: a 512²
drawing of the tiny Z-Image (as ``overhead.py`` draws), and a smooth 1024² picture with grain,
closer to what a real model draws. Process CPU time, median of ``--repeat`` runs.

    .venv/bin/python benchmarks/encode.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root is not on sys.path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image, ImageFilter

from benchmarks._common import quantile, table
from bot.domain import DrawRequest, Job, UserRef
from bot.ports import Rendered
from generation.images import ImageStore


def tiny_drawing(size: int) -> Image.Image:
    """What the tiny random Z-Image draws at ``size``² (8 steps): noise-like."""
    import torch
    from diffusers import DiffusionPipeline

    from generation.tiny import build_tiny_pipeline

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = DiffusionPipeline.from_pretrained(str(build_tiny_pipeline(Path(tmp) / "tiny")))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a red fox in the snow", height=size, width=size, num_inference_steps=8,
               guidance_scale=0.0, generator=torch.Generator().manual_seed(1))  # fmt: skip
    image: Image.Image = out.images[0]
    return image


def smooth_picture(size: int) -> Image.Image:
    """Large soft shapes with a little grain, as photographs and paintings have."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8))
    soft = np.asarray(base.resize((size, size), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(3)))
    grain = rng.integers(-4, 5, soft.shape)
    return Image.fromarray(np.clip(soft.astype(int) + grain, 0, 255).astype(np.uint8))


def cpu_ms(fn: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        samples.append(time.process_time() - start)
    return round(1000 * (quantile(samples, 0.5) or 0.0), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=9, help="runs per figure (default 9)")
    args = parser.parse_args(argv)
    images = {"tiny Z-Image 512²": tiny_drawing(512), "smooth 1024²": smooth_picture(1024)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = ImageStore(Path(tmp), "benchmark")
        for label, image in images.items():
            request = DrawRequest(
                prompt="a red fox", width=image.width, height=image.height, steps=8, guidance=0.0
            )
            job = Job(id="enc", user=UserRef(platform="bench", id="u"), request=request, model="benchmark",
                      credits=1, gpu_seconds=1.0, seeds=(1,), created_at=time.time())  # fmt: skip
            rendered = Rendered(images=[image], seeds=(1,), seconds=1.0)
            old = Path(tmp) / "old.png"
            before = cpu_ms(lambda image=image, old=old: image.save(old, format="PNG"), args.repeat)
            after = cpu_ms(lambda job=job, rendered=rendered: store.save(job, rendered), args.repeat)
            [saved] = store.save(job, rendered)
            photo = saved.photo.data if saved.photo else b""
            rows.append([label, f"{before}", f"{old.stat().st_size // 1000} KB", f"{after}",
                         f"{saved.size_bytes // 1000} KB + {len(photo) // 1000} KB JPEG",
                         f"{before / after:.2f}x" if after else "—"])  # fmt: skip
    print(
        table(["image", "before ms", "before upload", "after ms (PNG + JPEG)", "after files", "faster"], rows)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

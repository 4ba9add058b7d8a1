"""ImageStore: PNG files with A1111 metadata, reading it back, and fitting uploads to a size limit."""

from __future__ import annotations

import io
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.domain import DrawRequest, Job, UserRef
from bot.errors import DeliveryError
from bot.ports import ImageSink, Rendered
from generation.images import ImageStore, format_parameters, parse_parameters, read_parameters

WHEN = datetime(2025, 1, 2, 3, 4, 5).timestamp()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def job(request: DrawRequest, seeds: tuple[int, ...], job_id: str = "j1") -> Job:
    return Job(
        id=job_id,
        user=UserRef(platform="telegram", id="42"),
        request=request,
        model="tiny",
        credits=1,
        gpu_seconds=0.1,
        seeds=seeds,
        created_at=WHEN,
    )


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "outputs", "tiny", clock=lambda: WHEN)


def test_save_names_files_and_writes_metadata(store: ImageStore, tmp_path: Path) -> None:
    sink: ImageSink = store  # the port, checked by mypy
    req = DrawRequest(prompt="a red fox, in snow", width=64, height=48, steps=8, guidance=0.0, count=2)
    rendered = Rendered(images=[noise(64, 48, 1), noise(64, 48, 2)], seeds=(7, 8), seconds=0.1)
    saved = sink.save(job(req, (7, 8), "job/1:x"), rendered)

    folder = tmp_path / "outputs" / "2025-01-02"
    assert [Path(s.path) for s in saved] == [
        folder / "20250102-030405_job_1_x_0_7.png",
        folder / "20250102-030405_job_1_x_1_8.png",
    ]
    assert sorted(p.name for p in folder.iterdir()) == [Path(s.path).name for s in saved]  # no partial files
    first = saved[0]
    assert (first.seed, first.width, first.height) == (7, 64, 48)
    assert first.size_bytes == Path(first.path).stat().st_size

    with Image.open(first.path) as img:
        raw = img.text["parameters"]  # type: ignore[attr-defined]
    assert (
        raw
        == "a red fox, in snow\nSteps: 8, Sampler: FlowMatchEuler, CFG scale: 0.0, Seed: 7, Size: 64x48, Model: tiny"
    )
    meta = read_parameters(first.path)
    assert meta["prompt"] == "a red fox, in snow" and meta["negative_prompt"] == ""
    assert (meta["steps"], meta["seed"], meta["size"], meta["model"]) == ("8", "7", "64x48", "tiny")
    assert meta["brushbot"] == {
        "prompt": "a red fox, in snow",
        "negative_prompt": "",
        "steps": 8,
        "guidance": 0.0,
        "seed": 7,
        "width": 64,
        "height": 48,
        "model": "tiny",
        "sampler": "FlowMatchEuler",
        "job_id": "job/1:x",
    }
    assert read_parameters(saved[1].path)["seed"] == "8"


def test_each_image_is_saved_lossless_with_a_jpeg_preview_for_chat_photos(store: ImageStore) -> None:
    req = DrawRequest(prompt="smooth", width=96, height=64, steps=8, guidance=0.0)
    gradient = Image.fromarray(np.tile(np.arange(96, dtype=np.uint8) * 2, (64, 1))).convert("RGB")
    [saved] = store.save(job(req, (3,)), Rendered(images=[gradient], seeds=(3,), seconds=0.1))
    with Image.open(saved.path) as png:
        assert png.format == "PNG" and np.array_equal(np.asarray(png), np.asarray(gradient))  # lossless
    photo = saved.photo
    assert photo is not None and (photo.mime, photo.format, photo.reencoded) == ("image/jpeg", "jpeg", True)
    assert photo.filename == Path(saved.path).with_suffix(".jpg").name
    with Image.open(io.BytesIO(photo.data)) as jpeg:
        assert jpeg.format == "JPEG" and jpeg.size == (96, 64)
        # high quality: close to the original everywhere
        assert np.abs(np.asarray(jpeg, dtype=int) - np.asarray(gradient, dtype=int)).max() <= 8
    plain = ImageStore(store.output_dir, "tiny", clock=lambda: WHEN, photos=False)
    [no_photo] = plain.save(job(req, (4,), "j2"), Rendered(images=[gradient], seeds=(4,), seconds=0.1))
    assert no_photo.photo is None


def test_unicode_multiline_prompt_and_negative_round_trip(store: ImageStore) -> None:
    prompt = "一只红狐狸\n在雪中 🦊"
    req = DrawRequest(
        prompt=prompt, negative_prompt="模糊, 低质量", width=64, height=64, steps=9, guidance=3.5
    )
    saved = store.save(job(req, (123,)), Rendered(images=[noise(64, 64)], seeds=(123,), seconds=0.1))
    meta = read_parameters(saved[0].path)
    assert meta["prompt"] == prompt and meta["negative_prompt"] == "模糊, 低质量"
    assert (meta["cfg_scale"], meta["steps"], meta["seed"]) == ("3.5", "9", "123")
    assert meta["brushbot"]["negative_prompt"] == "模糊, 低质量"


def test_parameters_quote_values_with_commas() -> None:
    req = DrawRequest(prompt="p", width=64, height=64, steps=4, guidance=7.0)
    text = format_parameters(req, seed=1, width=64, height=64, model="my, model", sampler="Euler")
    assert text.endswith('Model: "my, model"')
    parsed = parse_parameters(text)
    assert parsed["model"] == "my, model" and parsed["cfg_scale"] == "7.0" and parsed["sampler"] == "Euler"


def test_read_parameters_of_an_image_without_metadata(tmp_path: Path) -> None:
    plain = tmp_path / "plain.png"
    noise(8, 8).save(plain)
    assert read_parameters(plain) == {}


def _saved(store: ImageStore, size: int = 256) -> str:
    req = DrawRequest(prompt="noise", width=size, height=size, steps=8, guidance=0.0)
    rendered = Rendered(images=[noise(size, size)], seeds=(5,), seconds=0.1)
    return store.save(job(req, (5,)), rendered)[0].path


def test_fit_keeps_a_png_that_fits(store: ImageStore) -> None:
    path = _saved(store)
    data = Path(path).read_bytes()
    upload = store.fit(path, len(data))
    assert (upload.format, upload.mime, upload.reencoded) == ("png", "image/png", False)
    assert upload.data == data and upload.filename == Path(path).name


def test_fit_reencodes_an_oversized_png(store: ImageStore) -> None:
    path = _saved(store)
    size = Path(path).stat().st_size
    upload = store.fit(path, size // 2)
    assert upload.reencoded and upload.format in {"jpeg", "webp"}
    assert len(upload.data) <= size // 2
    suffix = {"jpeg": ".jpg", "webp": ".webp"}[upload.format]
    assert upload.filename == Path(path).stem + suffix
    assert upload.mime == f"image/{upload.format}"
    with Image.open(io.BytesIO(upload.data)) as img:
        assert img.format == upload.format.upper() and img.size == (256, 256)


def test_fit_refuses_what_cannot_fit(store: ImageStore, tmp_path: Path) -> None:
    path = _saved(store)
    with pytest.raises(DeliveryError) as err:
        store.fit(path, 100)
    message = str(err.value)
    assert "\n" not in message and re.search(r"limit 100 bytes", message)
    with pytest.raises(DeliveryError, match="missing"):
        store.fit(str(tmp_path / "gone.png"), 10_000_000)

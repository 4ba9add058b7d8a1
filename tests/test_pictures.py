"""Drawing from a picture: the grammar, the input checks, the kept sources, the three tiny pipelines,
metadata, credits by the steps run, Vary, and recovery after a restart."""

from __future__ import annotations

import asyncio
import hashlib
import io
import sqlite3
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile

from bot.config import Settings
from bot.domain import (
    VARY_STRONG,
    VARY_SUBTLE,
    DrawRequest,
    Job,
    JobState,
    SourceImage,
    StepRounding,
    UserRef,
    credit_cost,
    gpu_cost,
)
from bot.errors import GenerationError, RequestError
from bot.grammar import Limits, build_request, parse_draw, precheck_picture_request, split_flags
from bot.inputs import check_format, check_size, read_limited, read_picture_file, take_image_flag
from bot.recording import RecordingHub
from bot.service import Service
from data import SqliteStore
from generation.images import ImageStore, read_parameters
from generation.presets import resolve_profile
from generation.sources import SourceStore, decode_picture, fit_source, img2img_arguments
from generation.worker import Worker
from tests.support import PROFILE, png_header_only
from tests.test_service import ALICE, BOB, Harness, ledger

Z_IMAGE = resolve_profile("z-image-turbo", diffusers_steps_fix=True)
SDXL = resolve_profile("sdxl")
LIMITS = Limits()
MB = 1_000_000


# ---- pictures, built in memory -------------------------------------------------------------------


def gradient(width: int, height: int, seed: int = 0) -> Image.Image:
    """A picture with structure (a gradient plus a little noise), different per seed."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    base = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                           np.full((height, width, 1), 128.0)], axis=2)  # fmt: skip
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every pixel decode Pillow starts (``ImageFile.load``)."""
    loads: list[str] = []
    real = ImageFile.ImageFile.load

    def load(self: Any) -> Any:
        loads.append(str(self.format))
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return loads


def source(width: int = 4032, height: int = 3024) -> SourceImage:
    return SourceImage(ref="ab" * 32, width=width, height=height, format="jpeg")


# ---- grammar and sizing --------------------------------------------------------------------------


def test_strength_defaults_validates_and_never_clamps() -> None:
    r = build_request(split_flags("a watercolour"), Z_IMAGE, LIMITS, source())
    assert (r.strength, r.source, r.from_picture) == (0.6, "ab" * 32, True)
    assert build_request(split_flags("x --strength 0.05"), Z_IMAGE, LIMITS, source()).strength == 0.05
    assert build_request(split_flags("x --strength 1"), Z_IMAGE, LIMITS, source()).strength == 1.0
    for value, message in [
        ("0", "--strength 0 is out of range: allowed 0.05–1"),
        ("1.5", "--strength 1.5 is out of range: allowed 0.05–1"),
        ("0.01", "--strength 0.01 is out of range: allowed 0.05–1"),
        ("lots", "--strength lots is not a number: allowed 0.05–1"),
    ]:
        with pytest.raises(RequestError) as err:
            build_request(split_flags(f"x --strength {value}"), Z_IMAGE, LIMITS, source())
        assert str(err.value) == message
    with pytest.raises(RequestError, match="--strength is for drawing from a picture"):
        parse_draw("x --strength 0.5", Z_IMAGE, LIMITS)
    assert parse_draw("x", Z_IMAGE, LIMITS).strength is None


def test_output_keeps_the_pictures_shape_unless_size_or_ar_says_otherwise() -> None:
    # a 4:3 phone photo: about 1024² pixels in multiples of 16 (Z-Image) or 8 (SDXL)
    r = build_request(split_flags("x"), Z_IMAGE, LIMITS, source(4032, 3024))
    assert (r.width, r.height) == (1184, 880)
    assert abs(r.width * r.height / Z_IMAGE.default_pixels - 1) < 0.05
    portrait = build_request(split_flags("x"), SDXL, LIMITS, source(1080, 1920))
    assert portrait.width % 8 == 0 and portrait.height % 8 == 0
    assert abs(portrait.width / portrait.height - 1080 / 1920) < 0.02
    assert build_request(split_flags("x --ar 1:1"), Z_IMAGE, LIMITS, source()).width == 1024
    sized = build_request(split_flags("x --size 768x1024"), Z_IMAGE, LIMITS, source())
    assert (sized.width, sized.height) == (768, 1024)
    with pytest.raises(RequestError) as err:
        build_request(split_flags("x"), Z_IMAGE, LIMITS, source(5000, 1000))
    assert "wider than 4:1" in str(err.value) and "--ar" in str(err.value)
    # the same panorama is fine with a shape chosen: it is centre-cropped to it
    assert build_request(split_flags("x --ar 16:9"), Z_IMAGE, LIMITS, source(5000, 1000)).width == 1360


def test_a_model_without_image_to_image_refuses_in_one_line() -> None:
    generic = resolve_profile("someone/some-model")
    assert generic.img2img is None
    with pytest.raises(RequestError) as err:
        precheck_picture_request(split_flags("a fox"), generic, LIMITS)
    assert str(err.value) == (
        "the model someone/some-model cannot draw from a picture; send /draw without one"
    )
    with pytest.raises(RequestError, match="cannot draw from a picture"):
        build_request(split_flags("a fox"), generic, LIMITS, source())
    # the words are checked before the picture is decoded
    with pytest.raises(RequestError, match="--steps 0"):
        precheck_picture_request(split_flags("a fox --steps 0"), Z_IMAGE, LIMITS)


def test_request_json_is_backward_compatible() -> None:
    old = {"prompt": "a fox", "width": 64, "height": 64, "steps": 8, "guidance": 0.0, "seed": 1}
    assert DrawRequest.from_json(old).strength is None and DrawRequest.from_json(old).source is None
    text = parse_draw("a fox", Z_IMAGE, LIMITS)
    assert "strength" not in text.to_json()  # text rows are stored exactly as before
    picture = build_request(split_flags("a fox --strength 0.35"), Z_IMAGE, LIMITS, source())
    assert picture.to_json()["strength"] == 0.35 and picture.to_json()["source"] == "ab" * 32
    assert DrawRequest.from_json(picture.to_json()) == picture
    with pytest.raises(ValueError, match="together"):
        DrawRequest(prompt="x", width=64, height=64, steps=8, guidance=0.0, strength=0.5)


# ---- steps run, credits and cost -----------------------------------------------------------------


def test_steps_run_follow_each_family_and_match_diffusers_exactly() -> None:
    from diffusers import (
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
        ZImageImg2ImgPipeline,
    )

    assert StepRounding.UP.steps_run(8, 0.6) == 5  # Z-Image: ceil(4.8)
    assert StepRounding.DOWN.steps_run(8, 0.6) == 4  # SD and SDXL: floor(4.8)
    strengths = [round(0.05 * i, 2) for i in range(1, 21)] + [VARY_SUBTLE, VARY_STRONG, 0.33, 0.7]
    families = [
        (StepRounding.UP, ZImageImg2ImgPipeline, FlowMatchEulerDiscreteScheduler(shift=3.0)),
        (StepRounding.DOWN, StableDiffusionImg2ImgPipeline, EulerDiscreteScheduler()),
        (StepRounding.DOWN, StableDiffusionXLImg2ImgPipeline, EulerDiscreteScheduler()),
    ]
    for rounding, pipeline, scheduler in families:
        for steps in range(1, 51):
            scheduler.set_timesteps(steps)
            for strength in strengths:
                _, run = pipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
                assert rounding.steps_run(steps, strength) == run, (pipeline.__name__, steps, strength)


def test_credits_and_gpu_cost_count_the_steps_that_run() -> None:
    text = parse_draw("x --steps 16", Z_IMAGE, LIMITS)
    half = build_request(split_flags("x --steps 16 --strength 0.5"), Z_IMAGE, LIMITS, source(1, 1))
    assert (credit_cost(text, Z_IMAGE), credit_cost(half, Z_IMAGE)) == (2, 1)
    assert Z_IMAGE.steps_run(half) == 8
    assert gpu_cost(half, 1.0, Z_IMAGE) == pytest.approx(gpu_cost(text, 1.0, Z_IMAGE) / 2)
    with pytest.raises(ValueError, match="profile"):
        gpu_cost(half, 1.0)
    # SD and SDXL round down: a strength that leaves no step is refused with the least that works
    with pytest.raises(RequestError) as err:
        build_request(split_flags("x --steps 8 --strength 0.1"), SDXL, LIMITS, source())
    assert str(err.value) == (
        "--strength 0.1 with 8 steps runs no denoising step on this model: "
        "use --strength 0.13 or more, or more --steps"
    )
    assert (
        SDXL.steps_run(build_request(split_flags("x --steps 8 --strength 0.13"), SDXL, LIMITS, source())) == 1
    )


# ---- untrusted input -----------------------------------------------------------------------------


def test_formats_are_told_by_their_bytes_not_their_name(tmp_path: Path) -> None:
    picture = gradient(24, 16)
    assert check_format(encode(picture, "PNG")[:16]) == "png"
    assert check_format(encode(picture, "JPEG")[:16]) == "jpeg"
    assert check_format(encode(picture, "WEBP")[:16]) == "webp"
    refusals = {
        "gif": (encode(picture, "GIF"), "GIF pictures are not supported: send a PNG, JPEG or WebP"),
        "text": (b"definitely not a picture\n", "that file is not a picture: send a PNG, JPEG or WebP"),
        "bmp": (encode(picture, "BMP"), "BMP pictures are not supported: send a PNG, JPEG or WebP"),
    }
    for name, (data, message) in refusals.items():
        path = tmp_path / f"{name}.png"  # the name says PNG; the bytes decide
        path.write_bytes(data)
        with pytest.raises(RequestError) as err:
            read_picture_file(path, 10 * MB)
        assert str(err.value) == message
    # a PNG's magic bytes on a broken body: refused as unreadable, not crashed on
    with pytest.raises(RequestError, match="could not be read"):
        decode_picture(encode(picture, "PNG")[:40], max_pixels=10**6)


async def test_byte_limit_before_and_while_reading(tmp_path: Path) -> None:
    limit = Settings(_env_file=None).max_input_bytes  # type: ignore[call-arg]
    assert limit == 20 * 1024 * 1024
    # the size a platform declares is checked before any download
    with pytest.raises(RequestError) as err:
        check_size(100 * MB, limit)
    assert str(err.value) == "the picture is 100.0 MB; the limit is 21.0 MB"
    # a download that lies about its size stops once past the limit: 100 MB are never read
    chunk = bytes(1024 * 1024)
    served: list[int] = []

    async def hundred_megabytes() -> AsyncIterator[bytes]:
        for i in range(100):
            served.append(i)
            yield chunk

    with pytest.raises(RequestError, match=r"over the limit of 21\.0 MB"):
        await read_limited(hundred_megabytes(), limit)
    assert len(served) == 21
    # a local 100 MB file (sparse: nothing is written) is refused from its size, unread
    big = tmp_path / "huge.png"
    with big.open("wb") as f:
        f.truncate(100 * MB)
    with pytest.raises(RequestError, match=r"the picture is 100\.0 MB; the limit is 21\.0 MB"):
        read_picture_file(big, limit)


def test_a_decompression_bomb_is_refused_from_its_header(no_decoding: list[str]) -> None:
    bomb = png_header_only(20000, 20000)
    assert len(bomb) < 200
    with pytest.raises(RequestError) as err:
        decode_picture(bomb, max_pixels=50_000_000)
    assert str(err.value) == "the picture has over 179 megapixels; the limit is 50 megapixels"
    # under Pillow's own threshold, over ours: our limit, still from the header
    with pytest.raises(RequestError) as err:
        decode_picture(png_header_only(9000, 9000), max_pixels=50_000_000)
    assert str(err.value) == "the picture is 9000x9000 (81 megapixels); the limit is 50 megapixels"
    assert no_decoding == []  # not one pixel was decoded


def test_exif_orientation_is_applied_and_metadata_dropped(tmp_path: Path) -> None:
    wide = Image.new("RGB", (40, 20), (220, 20, 20))
    wide.paste((20, 20, 220), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    exif[0x010F] = "PhoneMaker"  # camera make: metadata that must not be kept
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encode(wide, "JPEG", exif=exif.tobytes(), icc_profile=srgb, quality=95)
    store = SourceStore(tmp_path / "outputs")
    kept = store.keep(data, max_pixels=10**6)
    assert (kept.width, kept.height, kept.format) == (20, 40, "jpeg")  # upright
    path = store.path(kept.ref)
    assert path == tmp_path / "outputs" / "sources" / f"{kept.ref}.png"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == kept.ref  # content-addressed
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (20, 40)
        assert not {"exif", "icc_profile", "dpi"} & set(img.info) and not getattr(img, "text", {})
        assert not img.getexif()
        # turned 90° clockwise: the left (red) half is now on top
        top, bottom = img.getpixel((10, 5)), img.getpixel((10, 35))
        assert top[0] > 180 > top[2] and bottom[2] > 180 > bottom[0]
        # the sRGB profile was applied, not mangled: the colours are those of the picture
        plain, _ = decode_picture(encode(wide, "JPEG", exif=exif.tobytes(), quality=95), max_pixels=10**6)
        assert np.abs(np.asarray(img, np.int16) - np.asarray(plain, np.int16)).max() <= 8
    # the same picture is kept once
    assert store.keep(data, max_pixels=10**6) == kept
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_transparency_is_flattened_on_white_and_fit_crops_the_centre(tmp_path: Path) -> None:
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    image, fmt = decode_picture(encode(clear, "PNG"), max_pixels=100)
    assert fmt == "png" and image.getpixel((4, 4)) == (255, 255, 255)
    # three bands left to right: the centre crop of a square keeps the middle one
    bands = Image.new("RGB", (90, 30))
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        bands.paste(color, (30 * i, 0, 30 * (i + 1), 30))
    fitted = fit_source(bands, 64, 64)
    assert fitted.size == (64, 64)
    assert fitted.getpixel((32, 32)) == (0, 255, 0) and fitted.getpixel((2, 32))[1] > 200
    wider = fit_source(bands, 96, 32)  # a shape close to the picture's: scaled, a little cropped
    assert wider.size == (96, 32) and wider.getpixel((2, 16))[0] > 200
    request = DrawRequest(
        prompt="x", width=64, height=48, steps=8, guidance=0, strength=0.6, source="ab" * 32
    )
    arguments = img2img_arguments(request, bands)
    assert arguments["strength"] == 0.6 and [i.size for i in arguments["image"]] == [(64, 48)]
    with pytest.raises(ValueError, match="strength"):
        img2img_arguments(DrawRequest(prompt="x", width=64, height=48, steps=8, guidance=0, strength=0.0,
                                      source="ab" * 32), bands)  # fmt: skip


def test_a_large_picture_is_kept_scaled_down_in_its_shape(tmp_path: Path) -> None:
    store = SourceStore(tmp_path)
    kept = store.keep(encode(gradient(400, 300), "PNG"), max_pixels=10**6, keep_pixels=30_000)
    assert (kept.width, kept.height) == (200, 150)
    with Image.open(store.path(kept.ref)) as img:
        assert img.size == (200, 150)
    small = store.keep(encode(gradient(40, 30), "PNG"), max_pixels=10**6, keep_pixels=30_000)
    assert (small.width, small.height) == (40, 30)  # never scaled up


def test_console_image_flag() -> None:
    assert take_image_flag("a fox --image in.png --seed 3") == ("a fox  --seed 3", "in.png")
    assert take_image_flag('a fox --image "my photo.jpg"') == ("a fox", "my photo.jpg")
    assert take_image_flag("a fox --seed 3") == ("a fox --seed 3", None)
    with pytest.raises(RequestError, match="needs the path"):
        take_image_flag("a fox --image")
    with pytest.raises(RequestError, match="twice"):
        take_image_flag("a --image x.png --image y.png")


# ---- the service: refusals cost nothing, Vary, restarts --------------------------------------------


def jobs_rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])


async def test_every_refused_picture_is_one_line_and_costs_nothing(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_input_bytes=64 * 1024)
    service = await h.open()
    try:
        big = encode(gradient(400, 400, 1), "PNG")  # about 400 KB of noise, over this 64 KiB limit
        assert len(big) > 64 * 1024
        refused = {
            "bytes": (big, f"the picture is {len(big) / MB:.1f} MB; the limit is 0.1 MB"),
            "bomb": (png_header_only(20000, 20000), "the picture has over 179 megapixels"),
            "text": (b"hello, I am a text file named photo.png\n", "that file is not a picture"),
            "gif": (encode(gradient(16, 16), "GIF"), "GIF pictures are not supported"),
        }
        for name, (data, message) in refused.items():
            with pytest.raises(RequestError) as err:
                await service.submit_picture(ALICE, "a fox", data, delivery={"chat": "alice"})
            text = str(err.value)
            assert text.startswith(message) and "\n" not in text, name
        with pytest.raises(RequestError, match=r"the picture is 100\.0 MB; the limit is 0\.1 MB"):
            service.check_picture_size(100 * MB)
        assert ledger(h.settings.db_path) == [] and jobs_rows(h.settings.db_path) == 0
        assert (await service.credits(ALICE)).available == 10
        assert not (h.settings.output_dir / "sources").exists()  # nothing refused was kept
    finally:
        await h.close()


async def test_submit_picture_and_vary_charge_the_steps_run_and_keep_the_source(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    service = await h.open()
    try:
        photo = encode(gradient(96, 64), "JPEG")
        ticket = await service.submit_picture(ALICE, "a watercolour --seed 7 --steps 8", photo,
                                              delivery={"chat": "alice"})  # fmt: skip
        request = ticket.job.request
        assert (request.strength, request.width, request.height) == (0.6, 80, 48)  # the 3:2 shape, ×16
        assert (SourceStore(h.settings.output_dir).path(request.source or "")).is_file()
        # PROFILE: 64² and 4 steps is one credit; 80x48 with 5 of 8 steps run is ceil(1.17) = 2
        assert PROFILE.steps_run(request) == 5 and ticket.credits_cost == 2
        await h.until(lambda hub: ticket.job.id in hub.finished())
        progress = [str(e.data) for e in h.hub.of(ticket.job.id, "progress")]
        assert progress and all(text.endswith("/5") for text in progress)  # "step 1/5": the steps run

        with pytest.raises(RequestError, match="out of range"):
            await service.vary(BOB, ticket.job.id, 0.0, delivery={"chat": "bob"})
        varied = await service.vary(BOB, ticket.job.id, VARY_SUBTLE, delivery={"chat": "bob"})
        job = varied.job
        assert job.user == BOB and job.request.prompt == "a watercolour"
        assert (job.request.strength, job.request.count, job.request.seed) == (VARY_SUBTLE, 1, None)
        assert (job.request.width, job.request.height) == (80, 48)
        assert job.request.source != request.source  # the result, not the photo, is drawn from
        assert PROFILE.steps_run(job.request) == 3 and varied.credits_cost == 1
        await h.until(lambda hub: job.id in hub.finished())
        assert h.gen.requests[-1].source == job.request.source
        # the kept source of a variation is the finished job's first image, without its metadata
        first = (await h.store.get_job(ticket.job.id)).outputs[0]  # type: ignore[union-attr]
        with (
            Image.open(first) as out,
            Image.open(SourceStore(h.settings.output_dir).path(job.request.source or "")) as kept,
        ):
            assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(kept))
        # /draw as a reply to a result: new words on that result, kept once (the same reference)
        result = await service.result_picture(ticket.job.id)
        replied = await service.submit_picture(BOB, "a sketch --strength 0.4", result, delivery={"chat": "b"})
        assert replied.job.request.source == job.request.source and replied.job.request.prompt == "a sketch"
        rerolled = await service.reroll(ALICE, ticket.job.id, delivery={"chat": "alice"})
        assert rerolled.job.request.source == request.source and rerolled.job.request.seed is None
        await h.settled()
        kinds = sorted(r[1] for r in ledger(h.settings.db_path))
        assert kinds == ["commit"] * 4 + ["reserve"] * 4
    finally:
        await h.close()


async def test_vary_needs_a_finished_picture(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.gen.hold = True
    service = await h.open()
    try:
        ticket = await h.draw(ALICE, "a fox")
        await h.gen.started.wait()
        with pytest.raises(RequestError, match=f"job {ticket.job.id} has no picture to vary yet"):
            await service.vary(ALICE, ticket.job.id, VARY_STRONG, delivery={"chat": "alice"})
        h.gen.release()
    finally:
        await h.close()


async def test_vary_works_on_a_job_from_before_a_restart(tmp_path: Path) -> None:
    one = Harness(tmp_path)
    await one.open()
    ticket = await one.draw(ALICE, "a lighthouse --seed 3")
    await one.until(lambda hub: ticket.job.id in hub.finished())
    await one.settled()
    await one.close()

    two = Harness(tmp_path)
    await two.open()
    try:
        varied = await two.service.vary(ALICE, ticket.job.id, VARY_STRONG, delivery={"chat": "alice"})
        await two.until(lambda hub: varied.job.id in hub.finished())
        await two.settled()
        stored = await two.store.get_job(varied.job.id)
        assert stored is not None and stored.state is JobState.DELIVERED
        assert stored.request.strength == VARY_STRONG and stored.request.source == varied.job.request.source
    finally:
        await two.close()


async def test_a_picture_job_is_recovered_after_a_restart_and_drawn_by_the_real_pipeline(
    tmp_path: Path, tiny_settings: Settings
) -> None:
    one = Harness(tmp_path)
    one.gen.hold = True
    # the jobs are asked of the model the next start runs (a job asked of another one is not resumed)
    one.gen.profile = replace(PROFILE, name="tiny")
    await one.open()
    await one.draw(ALICE, "held")
    await one.gen.started.wait()
    photo = encode(gradient(64, 96), "PNG")
    queued = await one.service.submit_picture(
        ALICE, "a watercolour --seed 9 --steps 8", photo, delivery={"chat": "a"}
    )
    await one.close()  # like a crash: one job running, the picture job queued

    settings = tiny_settings.model_copy(update={"output_dir": one.settings.output_dir})
    hub = RecordingHub()
    async with SqliteStore(one.settings.db_path) as store, Worker(settings) as worker:
        service = Service(settings=one.settings, store=store, workers=[worker],
                          sink=ImageStore(settings.output_dir, worker.profile.name),
                          sources=SourceStore(settings.output_dir))  # fmt: skip
        service.register(hub)
        await service.start()
        try:
            assert await service.recover() == 2
            await hub.wait_for(lambda h: queued.job.id in h.finished(), 60)
            async with asyncio.timeout(30):
                await service.wait_idle()
        finally:
            await service.close()
        job = await store.get_job(queued.job.id)
    assert job is not None and job.state is JobState.DELIVERED and job.request.source is not None
    steps = [str(e.data) for e in hub.of(job.id, "progress")]
    assert steps and all(text.endswith("/5") for text in steps)  # 0.6 × 8 rounded up, on the tiny Z-Image
    params = read_parameters(job.outputs[0])
    assert params["denoising_strength"] == "0.6" and params["source_hash"] == job.request.source[:10]
    with Image.open(job.outputs[0]) as img:
        assert img.size == (job.request.width, job.request.height) == (48, 80)


# ---- the real pipelines -------------------------------------------------------------------------


def settings_for(base: Settings, model: Path) -> Settings:
    return base.model_copy(update={"model": str(model)})


@pytest.mark.parametrize(
    ("model_fixture", "pipeline", "steps_run"),
    [
        ("tiny_model_dir", "ZImageImg2ImgPipeline", 5),
        ("tiny_sd_dir", "StableDiffusionImg2ImgPipeline", 4),
        ("tiny_sdxl_dir", "StableDiffusionXLImg2ImgPipeline", 4),
    ],
)
async def test_each_family_draws_from_a_picture(
    request: pytest.FixtureRequest, tiny_settings: Settings, model_fixture: str, pipeline: str, steps_run: int
) -> None:
    settings = settings_for(tiny_settings, request.getfixturevalue(model_fixture))
    store = SourceStore(settings.output_dir)
    photo = store.keep(encode(gradient(96, 64, 1), "JPEG"), max_pixels=10**6)
    other = store.keep(
        encode(gradient(96, 64, 2).transpose(Image.Transpose.ROTATE_180), "PNG"), max_pixels=10**6
    )
    async with Worker(settings) as worker:
        profile = worker.profile
        asked = build_request(split_flags("a watercolour --seed 7"), profile, Limits(), photo)
        assert asked.width / asked.height == pytest.approx(96 / 64, rel=0.2)
        calls: list[tuple[int, int]] = []

        def draw(req: DrawRequest, seeds: tuple[int, ...]) -> Any:
            return worker.generate(
                req, seeds, on_step=lambda s, t: calls.append((s, t)), cancel=threading.Event()
            )

        first = await draw(asked, (7,))
        assert type(worker._image_pipe).__name__ == pipeline
        assert calls == [(i, steps_run) for i in range(1, steps_run + 1)]  # progress counts what runs
        assert profile.steps_run(asked) == steps_run
        assert first.images[0].size == (asked.width, asked.height)
        again = await draw(asked, (7,))
        assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
        from_other = await draw(DrawRequest.from_json({**asked.to_json(), "source": other.ref}), (7,))
        assert not np.array_equal(np.asarray(first.images[0]), np.asarray(from_other.images[0]))
        # each image of a batch has its own reproducible seed
        batch = await draw(DrawRequest.from_json({**asked.to_json(), "count": 2}), (6, 7))
        assert (
            np.abs(np.asarray(batch.images[1], np.int16) - np.asarray(first.images[0], np.int16)).max() <= 1
        )
        assert np.abs(np.asarray(batch.images[0], np.int16) - np.asarray(first.images[0], np.int16)).max() > 1
        # text-to-image still runs on the warm pipeline, all its steps
        calls.clear()
        await draw(parse_draw("a fox --seed 7", profile, Limits()), (7,))
        assert calls[-1] == (8, 8)


async def test_metadata_names_the_strength_and_the_source(
    tiny_worker: Worker, tiny_settings: Settings
) -> None:
    store = SourceStore(tiny_settings.output_dir)
    kept = store.keep(encode(gradient(64, 64), "WEBP"), max_pixels=10**6)
    req = build_request(
        split_flags("a lighthouse --strength 0.5 --seed 4"), tiny_worker.profile, Limits(), kept
    )
    rendered = await tiny_worker.generate(req, (4,), on_step=lambda s, t: None, cancel=threading.Event())
    job = Job(id="j1", user=UserRef(platform="cli", id="me"), request=req, model="tiny", credits=1,
              gpu_seconds=0.1, seeds=(4,), created_at=0.0)  # fmt: skip
    saved = ImageStore(tiny_settings.output_dir, "tiny").save(job, rendered)
    params = read_parameters(saved[0].path)
    assert "Denoising strength: 0.5, Source hash: " + kept.ref[:10] in params["parameters"]
    assert params["denoising_strength"] == "0.5" and params["steps"] == "8"
    assert params["brushbot"]["strength"] == 0.5 and params["brushbot"]["source"] == kept.ref


async def test_a_missing_source_fails_that_job_only(tiny_worker: Worker) -> None:
    lost = DrawRequest(prompt="x", width=64, height=64, steps=8, guidance=0.0, strength=0.6, source="0" * 64)
    with pytest.raises(GenerationError) as err:
        await tiny_worker.generate(lost, (1,), on_step=lambda s, t: None, cancel=threading.Event())
    assert str(err.value) == "The picture this job starts from is no longer on disk."
    fine = parse_draw("a fox", tiny_worker.profile, Limits())
    assert len((await tiny_worker.generate(fine, (1,), on_step=lambda s, t: None,
                                           cancel=threading.Event())).images) == 1  # fmt: skip


async def test_console_draws_from_a_picture_and_refuses_in_one_line(tmp_path: Path) -> None:
    from adapters.console import ConsoleAdapter

    h = Harness(tmp_path)
    service = await h.open()
    photo = tmp_path / "in.png"
    gradient(64, 64).save(photo)
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    script = f"/draw a fox --image {photo} --strength 0.5 --seed 3\n/draw a fox --image {notes}\n/draw x --image nope.png\n"
    out = io.StringIO()
    user = UserRef(platform="console", id="me")
    try:
        async with ConsoleAdapter(service, stdin=io.StringIO(script), stdout=out, user=user) as console:
            await console.run()
        text = out.getvalue()
        assert "Queued job" in text and "strength 0.5" in text and "(seed 3)" in text
        assert "⚠ That file is not a picture: send a PNG, JPEG or WebP\n" in text
        assert "⚠ There is no file nope.png\n" in text
        jobs = await h.store.user_jobs(user)
        assert [(j.request.strength, j.state) for j in jobs] == [(0.5, JobState.DELIVERED)]
    finally:
        await h.close()

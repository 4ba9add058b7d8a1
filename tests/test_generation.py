"""The generation package on the tiny model through the real from_pretrained path: presets, plans, worker."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bot.config import Device, DType, Offload, Settings
from bot.domain import DrawRequest, Job, StepRounding, UserRef
from bot.errors import CancelledError, ConfigError, GenerationError, OutOfMemoryError
from bot.ports import Generator, Rendered
from generation import presets
from generation.images import ImageStore, read_parameters
from generation.loading import (
    decide_plan,
    doctor_report,
    estimate_weights_bytes,
    load_pipeline,
    plan_device,
)
from generation.presets import PRESETS, TINY, cached_snapshot, repo_for, resolve_profile
from generation.worker import Worker

GB = 1024**3


def request(prompt: str = "a red fox in snow", *, count: int = 1, **kw: Any) -> DrawRequest:
    fields: dict[str, Any] = {"width": 64, "height": 64, "steps": 8, "guidance": 0.0, **kw}
    return DrawRequest(prompt=prompt, count=count, **fields)


def pixels(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


class Steps:
    """Records on_step calls and the thread they ran on."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.threads: set[int] = set()

    def __call__(self, step: int, total: int) -> None:
        self.calls.append((step, total))
        self.threads.add(threading.get_ident())


def settings_for(**kw: Any) -> Settings:
    return Settings(_env_file=None, **kw)  # type: ignore[call-arg]


# ---- presets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_sizes_are_valid(name: str) -> None:
    profile = resolve_profile(name, diffusers_steps_fix=True)
    assert profile.name == name
    assert set(profile.sizes) == {"square", "portrait", "landscape", "wide"}
    m = profile.size_multiple
    for label, (w, h) in [
        ("default", (profile.default_width, profile.default_height)),
        *profile.sizes.items(),
    ]:
        assert w % m == 0 and h % m == 0, label
        assert profile.min_side <= min(w, h) and max(w, h) <= profile.max_side, label
        assert abs(w * h / profile.default_pixels - 1) < 0.2, label
    w, h = profile.sizes["portrait"]
    assert h > w
    w, h = profile.sizes["wide"]
    assert w / h > 1.6


def test_preset_defaults() -> None:
    z = resolve_profile("z-image-turbo", diffusers_steps_fix=True)
    assert (z.family, z.default_width, z.default_guidance, z.size_multiple) == ("z-image", 1024, 0.0, 16)
    assert z.negative_needs_guidance
    assert repo_for("z-image-turbo") == "Tongyi-MAI/Z-Image-Turbo"
    assert repo_for("sdxl-turbo") == "stabilityai/sdxl-turbo"
    assert repo_for("sdxl") == "stabilityai/stable-diffusion-xl-base-1.0"
    sdxl = resolve_profile("sdxl")
    assert (sdxl.default_steps, sdxl.default_guidance, sdxl.size_multiple) == (30, 5.0, 8)
    turbo = resolve_profile("sdxl-turbo")
    assert (turbo.default_width, turbo.default_steps, turbo.default_guidance) == (512, 4, 0.0)
    tiny = resolve_profile(TINY)
    assert (tiny.family, tiny.default_width, tiny.default_steps, tiny.min_side, tiny.max_side) == (
        "z-image",
        64,
        8,
        16,
        512,
    )
    assert tiny.seconds_per_mpx_step > 0
    assert presets.preferred_dtype("z-image-turbo") is DType.BFLOAT16


def test_z_image_steps_follow_the_diffusers_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_profile("z-image-turbo", diffusers_steps_fix=True).default_steps == 8
    assert resolve_profile("z-image-turbo", diffusers_steps_fix=False).default_steps == 9
    module = importlib.import_module("diffusers.pipelines.z_image.pipeline_z_image")
    has_fix = hasattr(module, "get_default_z_image_sigmas")
    assert presets.diffusers_has_steps_fix() is has_fix  # the imported module's attributes
    monkeypatch.delitem(sys.modules, module.__name__)
    assert presets.diffusers_has_steps_fix() is has_fix  # the source, without importing it
    assert resolve_profile("z-image-turbo").default_steps == (8 if has_fix else 9)


def _pipeline_dir(root: Path, class_name: str) -> Path:
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return root


def test_local_folders_and_repo_ids(tmp_path: Path, tiny_model_dir: Path) -> None:
    z = resolve_profile(str(_pipeline_dir(tmp_path / "zimg", "ZImagePipeline")), diffusers_steps_fix=False)
    assert (z.name, z.family, z.default_width, z.default_steps) == ("zimg", "z-image", 1024, 9)
    xl = resolve_profile(str(_pipeline_dir(tmp_path / "xl", "StableDiffusionXLPipeline")))
    assert (xl.family, xl.default_width, xl.default_steps, xl.default_guidance) == ("sdxl", 1024, 30, 5.0)
    sd = resolve_profile(str(_pipeline_dir(tmp_path / "sd", "StableDiffusionPipeline")))
    assert (sd.family, sd.default_width, sd.default_steps, sd.default_guidance) == ("sd", 512, 25, 7.0)
    assert sd.size_multiple == 8 and sd.img2img is StepRounding.DOWN and xl.img2img is StepRounding.DOWN
    other = resolve_profile(str(_pipeline_dir(tmp_path / "flux", "FluxPipeline")))
    assert (other.family, other.default_width, other.default_steps, other.default_guidance) == (
        "generic",
        512,
        25,
        7.0,
    )
    assert other.size_multiple == 8 and other.img2img is None  # no image-to-image for unknown families
    assert resolve_profile(str(tiny_model_dir)) == resolve_profile(TINY)
    assert repo_for(str(tmp_path / "xl")) == str(tmp_path / "xl")

    # a repo id that is not in the (empty) cache: generic defaults, named by the repo
    hub = resolve_profile("someone/some-model", cache_dir=tmp_path / "cache")
    assert (hub.name, hub.family) == ("someone/some-model", "generic")
    assert repo_for("someone/some-model") == "someone/some-model"

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"model_index\.json"):
        resolve_profile(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"MODEL folder .*gone does not exist"):
        resolve_profile(str(tmp_path / "gone"))
    with pytest.raises(ConfigError, match="not a preset") as err:
        resolve_profile("no such model at all")
    assert "\n" not in str(err.value)


# ---- device plans ----------------------------------------------------------------------------------


def test_plan_auto() -> None:
    auto = settings_for()
    cpu = decide_plan(auto, cuda=False)
    assert (cpu.device, cpu.dtype, cpu.offload) == ("cpu", DType.FLOAT32, Offload.NONE)
    mps = decide_plan(auto, cuda=False, mps=True)
    assert (mps.device, mps.dtype, mps.offload) == ("mps", DType.FLOAT16, Offload.NONE)

    z = int(20.5e9)
    fits = decide_plan(auto, cuda=True, free_bytes=80 * GB, weights_bytes=z)
    assert (fits.device, fits.dtype, fits.offload) == ("cuda", DType.BFLOAT16, Offload.NONE)
    # 20.5 GB does not fit a 16 GB card, but one component at a time (the 60% transformer) does;
    # with no quantization package installed (tests/test_speed.py covers the 8- and 4-bit tiers)
    tight = decide_plan(auto, cuda=True, free_bytes=15 * GB, weights_bytes=z, largest_share=0.6)
    assert tight.offload is Offload.MODEL
    small = decide_plan(auto, cuda=True, free_bytes=5 * GB, weights_bytes=z)
    assert small.offload is Offload.SEQUENTIAL
    old = decide_plan(auto, cuda=True, bf16_supported=False, free_bytes=80 * GB, weights_bytes=z)
    assert old.dtype is DType.FLOAT16
    unknown = decide_plan(auto, cuda=True, free_bytes=None, weights_bytes=None)
    assert unknown.offload is Offload.NONE and "unknown" in unknown.reason


def test_plan_explicit_settings_win() -> None:
    z = int(20.5e9)
    forced = settings_for(device=Device.CUDA, dtype=DType.FLOAT16, offload=Offload.SEQUENTIAL)
    plan = decide_plan(forced, cuda=True, free_bytes=80 * GB, weights_bytes=z)
    assert (plan.device, plan.dtype, plan.offload) == ("cuda", DType.FLOAT16, Offload.SEQUENTIAL)
    on_cpu = decide_plan(settings_for(device=Device.CPU), cuda=True, free_bytes=80 * GB, weights_bytes=z)
    assert (on_cpu.device, on_cpu.dtype, on_cpu.offload) == ("cpu", DType.FLOAT32, Offload.NONE)
    # float32 weights are twice the 16-bit size: 2 x 20.5 x 1.2 > 40 GiB
    fp32 = decide_plan(settings_for(dtype=DType.FLOAT32), cuda=True, free_bytes=40 * GB, weights_bytes=z)
    assert fp32.offload is Offload.MODEL
    with pytest.raises(ConfigError, match="DEVICE=cuda"):
        decide_plan(settings_for(device=Device.CUDA), cuda=False)
    with pytest.raises(ConfigError, match="OFFLOAD=model"):
        decide_plan(settings_for(device=Device.CPU, offload=Offload.MODEL), cuda=True)


def test_plan_device_logs_one_line(
    tiny_settings: Settings, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="generation.loading"):
        plan = plan_device(tiny_settings, free_bytes_fn=lambda: 0)
    records = [r for r in caplog.records if r.name == "generation.loading"]
    assert len(records) == 1
    line = records[0].getMessage()
    assert "\n" not in line and line == plan.describe()
    assert "cpu" in line and "float32" in line and "DEVICE=cpu" in line
    size = sum(f.stat().st_size for f in tiny_model_dir.rglob("*.safetensors"))
    assert estimate_weights_bytes(str(tiny_model_dir)) == size
    assert estimate_weights_bytes("z-image-turbo") == PRESETS["z-image-turbo"].weights_bytes


def _cache_repo(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """Lay ``files`` out as huggingface_hub's cache holds a downloaded snapshot of ``repo``."""
    commit = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    for name, data in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    return snapshot


def test_doctor_tells_cached_from_not_downloaded(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    settings = settings_for(model="z-image-turbo", device=Device.CPU, model_cache_dir=cache)
    assert cached_snapshot(repo_for("z-image-turbo"), cache) is None
    report = doctor_report(settings)
    assert "model: z-image-turbo -> Tongyi-MAI/Z-Image-Turbo" in report[-2]
    assert report[-1].startswith("model files: not in the cache") and "downloaded" in report[-1]

    index = json.dumps({"_class_name": "ZImagePipeline"}).encode()
    _cache_repo(cache, "Tongyi-MAI/Z-Image-Turbo", {"model_index.json": index})
    assert (
        doctor_report(settings)[-1]
        == "model files: partly in the cache: the weights will be downloaded on first start"
    )
    snapshot = _cache_repo(
        cache, "someone/some-model", {"model_index.json": index, "unet/w.safetensors": b"x" * 1000}
    )
    assert cached_snapshot("someone/some-model", cache) == snapshot
    assert cached_snapshot("/not/a/repo", cache) is None
    hub = settings.model_copy(update={"model": "someone/some-model"})
    assert estimate_weights_bytes(hub.model, cache) == 1000
    assert resolve_profile(hub.model, cache_dir=cache).family == "z-image"  # read from the cached index
    assert doctor_report(hub)[-1].startswith("model files: in the cache (")
    with pytest.raises(ConfigError, match="does not exist"):
        doctor_report(settings.model_copy(update={"model": str(tmp_path / "no-such-folder")}))


def test_model_tiny_is_built_once_then_reused(tiny_settings: Settings) -> None:
    settings = tiny_settings.model_copy(update={"model": TINY})
    pipe, profile, plan = load_pipeline(settings)
    assert type(pipe).__name__ == "ZImagePipeline"
    assert profile == resolve_profile(TINY) and plan.device == "cpu"
    index = settings.model_cache_dir / TINY / "model_index.json"
    built = index.stat().st_mtime_ns
    load_pipeline(settings)
    assert index.stat().st_mtime_ns == built


def test_missing_model_is_one_config_error(tiny_settings: Settings) -> None:
    settings = tiny_settings.model_copy(update={"model": "nobody/not-downloaded"})
    with pytest.raises(ConfigError, match="cannot load MODEL=nobody/not-downloaded") as err:
        load_pipeline(settings)
    assert "\n" not in str(err.value)


# ---- the worker ------------------------------------------------------------------------------------

Wrap = Callable[[Any], Any]


def wrapping(wrap: Wrap, record: list[int] | None = None) -> Callable[[Settings], Any]:
    """A pipeline factory that loads the real tiny pipeline and wraps it in a test fake."""

    def factory(settings: Settings) -> Any:
        if record is not None:
            record.append(threading.get_ident())
        pipe, profile, plan = load_pipeline(settings)
        return wrap(pipe), profile, plan

    return factory


class PipelineFake:
    """Wraps the real pipeline; subclasses change what a call does."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, **kwargs: Any) -> Any:
        return self.pipe(**kwargs)


async def test_worker_is_deterministic_and_reports_steps(tiny_worker: Worker) -> None:
    assert isinstance(tiny_worker, Generator)
    assert tiny_worker.profile.name == TINY and tiny_worker.device == "cpu"
    assert tiny_worker.load_seconds is not None and tiny_worker.plan is not None
    steps = Steps()
    first = await tiny_worker.generate(request(), (7,), on_step=steps, cancel=threading.Event())
    assert isinstance(first, Rendered) and first.seeds == (7,) and "total" in first.timings
    assert steps.calls == [(i, 8) for i in range(1, 9)]
    assert steps.threads == {threading.get_ident()}  # on the event loop, not the GPU thread
    again = await tiny_worker.generate(request(), (7,), on_step=Steps(), cancel=threading.Event())
    other = await tiny_worker.generate(request(), (8,), on_step=Steps(), cancel=threading.Event())
    assert first.images[0].size == (64, 64)
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))
    assert not np.array_equal(pixels(first.images[0]), pixels(other.images[0]))


async def test_each_image_has_its_own_seed(tiny_worker: Worker) -> None:
    batch = await tiny_worker.generate(
        request(count=2, width=48, height=80), (11, 12), on_step=Steps(), cancel=threading.Event()
    )
    single = await tiny_worker.generate(
        request(width=48, height=80), (12,), on_step=Steps(), cancel=threading.Event()
    )
    assert len(batch.images) == 2 and batch.images[1].size == (48, 80)
    # batching may reorder float sums: allow one level of rounding, nothing more
    assert np.abs(pixels(batch.images[1]) - pixels(single.images[0])).max() <= 1
    assert np.abs(pixels(batch.images[0]) - pixels(single.images[0])).max() > 1
    with pytest.raises(ValueError, match="seeds"):
        await tiny_worker.generate(request(count=2), (1,), on_step=Steps(), cancel=threading.Event())


async def test_chinese_prompt_is_saved_and_read_back(tiny_worker: Worker, tmp_path: Path) -> None:
    prompt = "一只在雪中的红狐狸, 水彩画 🦊"
    req = request(prompt, negative_prompt="模糊", guidance=2.0)
    rendered = await tiny_worker.generate(req, (42,), on_step=Steps(), cancel=threading.Event())
    job = Job(
        id="j-zh",
        user=UserRef(platform="console", id="1"),
        request=req,
        model=TINY,
        credits=1,
        gpu_seconds=0.1,
        seeds=(42,),
        created_at=0.0,
    )
    saved = await asyncio.to_thread(ImageStore(tmp_path, TINY).save, job, rendered)
    meta = read_parameters(saved[0].path)
    assert meta["prompt"] == prompt and meta["negative_prompt"] == "模糊"
    assert meta["seed"] == "42" and meta["cfg_scale"] == "2.0"
    assert meta["brushbot"]["prompt"] == prompt


def count_frees(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records each time a worker runs its gc + CUDA cache clean-up."""
    freed: list[int] = []
    real = Worker._free_memory

    def free_memory(self: Worker) -> None:
        freed.append(1)
        real(self)

    monkeypatch.setattr(Worker, "_free_memory", free_memory)
    return freed


async def test_cancel_mid_run_then_next_job_runs(
    tiny_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    cancel = threading.Event()
    freed = count_frees(monkeypatch)

    class GateAtStepTwo(PipelineFake):
        # holds the denoising loop after step 2 until the test's on_step (on the event loop)
        # has set cancel, so the cancel lands mid-run whatever the machine's speed
        def __call__(self, **kwargs: Any) -> Any:
            callback = kwargs["callback_on_step_end"]

            def gated(p: Any, i: int, t: Any, kw: dict[str, Any]) -> Any:
                out = callback(p, i, t, kw)
                if i + 1 == 2:
                    assert cancel.wait(timeout=30)
                return out

            return self.pipe(**{**kwargs, "callback_on_step_end": gated})

    def on_step(step: int, total: int) -> None:
        seen.append(step)
        if step == 2:
            cancel.set()

    seen: list[int] = []
    async with Worker(tiny_settings, pipeline_factory=wrapping(GateAtStepTwo)) as worker:
        with pytest.raises(CancelledError):
            await worker.generate(request(), (1,), on_step=on_step, cancel=cancel)
        # step 2's own check may already see the cancel (the loop can be quicker than the
        # worker thread), else step 3's does: either way the run stops within one step
        assert seen in ([1, 2], [1, 2, 3])
        done = await worker.generate(request(), (1,), on_step=Steps(), cancel=threading.Event())
        assert len(done.images) == 1
        # a job cancelled before it starts never runs
        steps = Steps()
        with pytest.raises(CancelledError):
            await worker.generate(request(), (1,), on_step=steps, cancel=cancel)
        assert steps.calls == []
        # a cancel is no failure: nothing to collect, the next job reuses the memory as it is
        assert freed == []


async def test_oom_and_errors_fail_one_job_only(
    tiny_settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    freed = count_frees(monkeypatch)

    failures: list[BaseException] = [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR\nsecret details"),
    ]

    class FailingFirst(PipelineFake):
        def __call__(self, **kwargs: Any) -> Any:
            if failures:
                raise failures.pop(0)
            return self.pipe(**kwargs)

    async with Worker(tiny_settings, pipeline_factory=wrapping(FailingFirst)) as worker:
        with pytest.raises(OutOfMemoryError) as oom:
            await worker.generate(request(), (1,), on_step=Steps(), cancel=threading.Event())
        assert "\n" not in str(oom.value) and "memory" in str(oom.value)
        with caplog.at_level(logging.ERROR, logger="generation.worker"):
            with pytest.raises(GenerationError) as err:
                await worker.generate(request(), (1,), on_step=Steps(), cancel=threading.Event())
        assert not isinstance(err.value, OutOfMemoryError)
        assert "secret" not in str(err.value) and "\n" not in str(err.value)
        assert any(r.exc_info for r in caplog.records)  # the operator gets the traceback
        done = await worker.generate(request(), (1,), on_step=Steps(), cancel=threading.Event())
        assert len(done.images) == 1 and worker.running
        assert len(freed) == 2  # each failure cleaned up after itself


async def test_only_the_worker_thread_touches_the_pipeline(tiny_settings: Settings) -> None:
    calls: list[int] = []
    loads: list[int] = []

    class Recording(PipelineFake):
        def __call__(self, **kwargs: Any) -> Any:
            calls.append(threading.get_ident())
            return self.pipe(**kwargs)

    settings = tiny_settings.model_copy(update={"warmup": True})
    async with Worker(settings, pipeline_factory=wrapping(Recording, loads)) as worker:
        for seed in (1, 2):
            await worker.generate(request(), (seed,), on_step=Steps(), cancel=threading.Event())
        owner = worker.thread_ident
    assert owner is not None and owner != threading.get_ident()
    assert len(calls) == 3  # the warm-up and two jobs
    assert set(calls) == set(loads) == {owner}


async def test_close_fails_queued_jobs_and_refuses_new_ones(tiny_settings: Settings) -> None:
    release = threading.Event()
    entered = asyncio.Event()

    class Held(PipelineFake):
        def __call__(self, **kwargs: Any) -> Any:
            loop.call_soon_threadsafe(entered.set)
            assert release.wait(timeout=30)
            return self.pipe(**kwargs)

    loop = asyncio.get_running_loop()
    worker = Worker(tiny_settings, pipeline_factory=wrapping(Held))
    await worker.start()
    running = asyncio.create_task(worker.generate(request(), (1,), on_step=Steps(), cancel=threading.Event()))
    await entered.wait()
    queued = asyncio.create_task(worker.generate(request(), (2,), on_step=Steps(), cancel=threading.Event()))
    await asyncio.sleep(0)  # let the second job reach the queue
    closing = asyncio.create_task(worker.close())
    release.set()
    await closing
    with pytest.raises(GenerationError, match="shutting down"):
        await running  # interrupted at its first step by the shutdown
    with pytest.raises(GenerationError, match="shutting down"):
        await queued
    with pytest.raises(GenerationError, match="shutting down"):
        await worker.generate(request(), (3,), on_step=Steps(), cancel=threading.Event())
    assert not worker.running


async def test_a_model_that_cannot_load_fails_start(tiny_settings: Settings) -> None:
    settings = tiny_settings.model_copy(update={"model": "nobody/not-downloaded"})
    worker = Worker(settings)
    with pytest.raises(ConfigError, match="cannot load"):
        await worker.start()
    assert not worker.running


async def test_an_abandoned_job_stops_and_the_worker_goes_on(tiny_settings: Settings) -> None:
    release = threading.Event()
    entered = asyncio.Event()
    loop = asyncio.get_running_loop()

    class HeldOnce(PipelineFake):
        def __call__(self, **kwargs: Any) -> Any:
            if not release.is_set():
                loop.call_soon_threadsafe(entered.set)
                assert release.wait(timeout=30)
            return self.pipe(**kwargs)

    steps = Steps()
    async with Worker(tiny_settings, pipeline_factory=wrapping(HeldOnce)) as worker:
        task = asyncio.create_task(worker.generate(request(), (1,), on_step=steps, cancel=threading.Event()))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        done = await worker.generate(request(), (2,), on_step=Steps(), cancel=threading.Event())
        assert len(done.images) == 1
    assert len(steps.calls) <= 1  # the abandoned run stopped at its first step

"""Full-size GPU benchmark: Z-Image-Turbo's real architecture with random weights, raw and through the bot.

Builds the pipeline in memory on the device (random weights time exactly like real ones, and no
download is needed): Qwen3 text encoder (hidden 2560, 36 layers, 32 heads, 8 KV heads, head dim
128), the 6B ``ZImageTransformer2DModel`` (dim 3840, 30 + 2 + 2 layers, 30 heads), FLUX's VAE
and the in-memory tokenizer of ``generation.tiny``. bf16 on CUDA, 1024², 8 steps, guidance 0.

Each row is one configuration: the baseline, then each speed-up on its own (an attention
backend, ``torch.compile`` of the repeated blocks, fp8 layerwise casting), then the memory tiers
the bot loads through its own path (the pipeline saved once, then ``load_pipeline`` with
``QUANTIZE=int8|fp8|nf4``, fp8 with ``COMPILE=true``, and ``QUANTIZE=auto`` under a 16 GiB and an
8 GiB budget emulated with ``torch.cuda.set_per_process_memory_fraction``). Per row: warm per-image
latency (p50) of raw ``pipe(...)`` calls and of one job at a time through the bot path (``Service``
→ ``Worker`` → ``ImageStore`` → SQLite → reply), the throughput ratio of a burst of jobs through the
bot against the same raw calls made right before it (both by the wall clock, as ``overhead.py``),
the split text encoding / denoising / VAE decode / PNG encode, peak GPU memory and the first
image's time (what a compile or lazy set-up costs). ``--budget``
seconds bound the whole run: rows that would not fit are skipped.

    bash benchmarks/gpu.sh                                  # on the GPU machine (installs .whl/)
    .venv/bin/python benchmarks/gpu.py --tiny               # the same code, tiny and on the CPU
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: the repository root is not on sys.path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    LoopLag,
    TimedPipeline,
    bench_request,
    bench_settings,
    bot_path,
    busy_span,
    describe,
    endings,
    fmt,
    gaps_between,
    machine,
    ms,
    quantile,
    queued_before,
    quiet_logs,
    raw_call,
    results_path,
    table,
    wait_ended,
    write_json,
)
from bot.domain import DrawRequest
from bot.errors import first_line
from generation.tiny import TEXT_ENCODER_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG

_GB = 1024**3
PLATFORM = "bench"
#: the issue's goal for the bot path's throughput on a GPU
GPU_RATIO_GOAL = 0.97
#: attention backends worth a row where they are installed; the first ones ship with torch
ATTENTION_BACKENDS = ("_native_cudnn", "_native_flash", "flash", "_flash_3", "sage")
#: what the first (uncompiled) run of a compiled model may take, to decide whether the row fits
COMPILE_ALLOWANCE_S = 150.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Spec:
    """The architecture to build and the image to draw."""

    name: str
    model: str  # the MODEL preset whose profile the bot path uses
    size: int
    steps: int
    text_encoder: Mapping[str, Any]
    transformer: Mapping[str, Any]
    vae: Mapping[str, Any]


_FLUX_VAE: Mapping[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}

#: Tongyi-MAI/Z-Image-Turbo as published (text_encoder, transformer and vae config.json)
FULL = Spec(
    name="Z-Image-Turbo (random weights)",
    model="z-image-turbo",
    size=1024,
    steps=8,
    text_encoder={
        "vocab_size": 151936,
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    transformer={
        "all_patch_size": (2,),
        "all_f_patch_size": (1,),
        "in_channels": 16,
        "dim": 3840,
        "n_layers": 30,
        "n_refiner_layers": 2,
        "n_heads": 30,
        "n_kv_heads": 30,
        "norm_eps": 1e-5,
        "qk_norm": True,
        "cap_feat_dim": 2560,
        "rope_theta": 256.0,
        "t_scale": 1000.0,
        "axes_dims": [32, 48, 48],
        "axes_lens": [1536, 512, 512],
    },
    vae=_FLUX_VAE,
)

#: ``generation.tiny``'s own components (a few thousand weights each), for the CPU and the tests
TINY = Spec(
    name="tiny Z-Image (random weights)",
    model="tiny",
    size=64,
    steps=8,
    text_encoder=TEXT_ENCODER_CONFIG,
    transformer=TRANSFORMER_CONFIG,
    vae=VAE_CONFIG,
)


# ---------------------------------------------------------------------------- building


def build_pipeline(spec: Spec, device: str, dtype: Any) -> Any:
    """``ZImagePipeline`` with ``spec``'s architecture and random weights, built on ``device`` in ``dtype``.

    The tokenizer, the seeds and the build are ``generation.tiny``'s: ``TINY`` is the tiny model.
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    from generation.tiny import build_components, build_tokenizer

    tokenizer = build_tokenizer()
    with torch.device(device):
        built = build_components(
            tokenizer, text_encoder=spec.text_encoder, transformer=spec.transformer, vae=spec.vae
        )
    text_encoder, transformer, vae = (module.to(dtype).eval() for module in built)
    pipe: Any = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    if device == "cuda":
        torch.cuda.empty_cache()
    return pipe


def weights_gb(pipe: Any) -> float:
    total = 0
    for name in ("text_encoder", "transformer", "vae"):
        module = getattr(pipe, name)
        total += sum(p.numel() * p.element_size() for p in module.parameters())
    return round(total / _GB, 2)


# ---------------------------------------------------------------------------- measuring


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


@contextlib.contextmanager
def stage_clock(pipe: Any, device: str, marks: dict[str, float]) -> Iterator[None]:
    """Note when text encoding ends, denoising ends and VAE decoding ends (synchronising there only).

    The denoising loop itself is never synchronised: its end is read when VAE decoding starts.
    Also notes whether the decoded image is finite (random weights must not draw NaNs).
    """

    def mark(name: str) -> Callable[..., None]:
        def hook(*_args: Any) -> None:
            _sync(device)
            marks[name] = time.perf_counter()

        return hook

    def decoded(_module: Any, _args: Any, output: Any) -> None:
        import torch

        _sync(device)
        marks["vae_end"] = time.perf_counter()
        marks["finite"] = float(bool(torch.isfinite(output).all()))

    handles = [
        pipe.text_encoder.register_forward_hook(mark("text_end")),
        pipe.vae.decoder.register_forward_pre_hook(mark("denoise_end")),
        pipe.vae.decoder.register_forward_hook(decoded),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(slots=True)
class Row:
    """One configuration's figures (times in ms, memory in GiB)."""

    name: str
    status: str = "ok"  # ok | partial | skipped | unavailable | failed
    note: str = ""
    setup_s: float | None = None
    #: the first call after the configuration was applied (a compile's cost shows here)
    first_image_s: float | None = None
    raw_images: int = 0
    raw_p50_ms: float | None = None
    bot_images: int = 0
    bot_p50_ms: float | None = None
    burst_images: int = 0
    throughput_ratio: float | None = None
    steady_ratio: float | None = None
    gpu_idle_gap_median_ms: float | None = None
    gpu_idle_gap_max_ms: float | None = None
    loop_lag_p99_ms: float | None = None
    split_ms: dict[str, float | None] = field(default_factory=dict)
    finite: bool | None = None
    peak_gpu_gb: float | None = None
    #: the seeds the raw calls and the burst's pipeline calls drew (sorted): the same jobs on both sides
    raw_seeds: list[int] = field(default_factory=list)
    burst_seeds: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Run:
    """Everything one invocation needs while it measures."""

    spec: Spec
    device: str
    dtype: Any
    pipe: TimedPipeline
    folder: Path
    images: int
    warmup: int
    started: float  # time.monotonic() when the run began: the budget counts from there
    deadline: float
    per_image: float  # seconds, refined by the baseline row
    plan: Any
    profile: Any

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def prompt(self, index: int) -> str:
        # fixed width: every prompt has the same token count, so a compiled model never sees a new shape
        return f"a red fox in the snow, study {index:03d}"

    def request(self, index: int) -> DrawRequest:
        """Job ``index``: the raw calls and the bot path draw exactly these."""
        return bench_request(
            prompt=self.prompt(index), seed=index, size=self.spec.size, steps=self.spec.steps
        )

    def call(self, index: int) -> None:
        raw_call(self.pipe, self.request(index))


def _warm_up(run: Run, row: Row | None = None) -> None:
    for i in range(run.warmup):
        start = time.perf_counter()
        run.call(10_000 + i)
        _sync(run.device)
        if i == 0 and row is not None:
            row.first_image_s = round(time.perf_counter() - start, 2)
    run.pipe.take()


def _raw(run: Run, row: Row) -> float:
    """``run.images`` raw calls back to back on this thread; their wall-clock seconds, first start to last end."""
    run.pipe.take()
    start = time.perf_counter()
    for i in range(run.images):
        run.call(i)
    seconds = time.perf_counter() - start
    calls = run.pipe.take()
    row.raw_images = len(calls)
    row.raw_p50_ms = ms(quantile([c.seconds for c in calls], 0.5))
    row.raw_seeds = sorted(c.seed for c in calls)
    return seconds


def _split(run: Run, row: Row, samples: int = 2) -> None:
    from bot.domain import Job, UserRef
    from bot.ports import Rendered
    from generation.images import ImageStore

    sink = ImageStore(run.folder / "split", "benchmark")
    parts: dict[str, list[float]] = {
        k: [] for k in ("text_encoding", "denoising", "vae_decode", "to_pil", "png_encode")
    }
    finite = True
    for i in range(samples):
        marks: dict[str, float] = {}
        request = run.request(i)
        with stage_clock(run.pipe.pipe, run.device, marks):
            start = time.perf_counter()
            images = raw_call(run.pipe.pipe, request)
            end = time.perf_counter()
        job = Job(id=f"split{i}", user=UserRef(platform=PLATFORM, id="split"), request=request, model="benchmark",
                  credits=1, gpu_seconds=1.0, seeds=(i,), created_at=time.time())  # fmt: skip
        png_start = time.perf_counter()
        sink.save(job, Rendered(images=images, seeds=(i,), seconds=end - start))
        png_end = time.perf_counter()
        parts["text_encoding"].append(marks["text_end"] - start)
        parts["denoising"].append(marks["denoise_end"] - marks["text_end"])
        parts["vae_decode"].append(marks["vae_end"] - marks["denoise_end"])
        parts["to_pil"].append(end - marks["vae_end"])
        parts["png_encode"].append(png_end - png_start)
        finite = finite and bool(marks.get("finite", 0.0))
    row.split_ms = {k: ms(quantile(v, 0.5)) for k, v in parts.items()}
    row.finite = finite


async def _bot(run: Run, row: Row) -> None:
    """The bot path: the raw calls and right after them a burst of the same jobs, then one job at a time."""
    from bot.domain import UserRef
    from bot.recording import RecordingHub

    folder = Path(tempfile.mkdtemp(prefix=f"bot-{row.name.replace(':', '-')}-", dir=run.folder))
    settings = bench_settings(folder, model=run.spec.model, device=run.device, jobs=run.images + 1)
    hub = RecordingHub(platform=PLATFORM)
    async with bot_path(settings, run.pipe, run.profile, run.plan, transport=hub) as path:
        service = path.service
        users = [UserRef(platform=PLATFORM, id=f"user{n}") for n in range(2)]
        timeout = max(60.0, 20 * run.per_image)
        # the worker thread's first job sets up its own thread-local state (cuBLAS handles...)
        await service.submit(users[0], run.request(20_000), delivery={})
        await wait_ended(hub, 1, timeout)
        await service.wait_idle()
        # the raw baseline right before the burst, so both sides of the ratio meet the same machine;
        # on this thread (the warm-up's), blocking the loop while the service has nothing to do
        raw_seconds = _raw(run, row)
        # a burst from two users at once: the GPU should never wait for the bot
        if run.left() > (row.raw_images + 2) * run.per_image:
            ended = len(endings(hub))
            submitted: dict[int, float] = {}
            run.pipe.take()
            start = time.perf_counter()
            async with LoopLag() as lag:
                for i in range(row.raw_images):
                    submitted[i] = time.perf_counter()
                    await service.submit(users[i % 2], run.request(i), delivery={})
                await wait_ended(hub, ended + row.raw_images, max(120.0, 20 * row.raw_images * run.per_image))
            burst = time.perf_counter() - start
            calls = run.pipe.take()
            gaps = gaps_between(calls, queued_before(submitted))
            row.burst_images = row.raw_images
            row.burst_seeds = sorted(c.seed for c in calls)
            # both sides by the wall clock, as overhead.py: the raw loop against first submit to last delivery
            row.throughput_ratio = round(raw_seconds / burst, 4) if burst else None
            # the GPU thread's pace while the burst waited: without the first submit and the last
            # PNG and delivery, which a burst of 10 pays once and a queue of 1,000 pays once too
            span = busy_span(calls)
            row.steady_ratio = round(raw_seconds / span * len(calls) / row.raw_images, 4) if span else None
            row.gpu_idle_gap_median_ms = ms(quantile(gaps, 0.5))
            row.gpu_idle_gap_max_ms = ms(max(gaps) if gaps else None)
            row.loop_lag_p99_ms = lag.summary()["p99"]
        else:
            row.status, row.note = "partial", "no time left for the burst"
        await service.wait_idle()
        # one job at a time: what a user waits for when the queue is empty
        latencies: list[float] = []
        for i in range(run.images):
            if run.left() < 3 * run.per_image:
                if row.status == "ok":
                    row.status, row.note = "partial", "budget ran out during the bot path"
                break
            target = len(endings(hub)) + 1
            start = time.perf_counter()
            await service.submit(users[i % 2], run.request(i), delivery={})
            await wait_ended(hub, target, timeout)
            latencies.append(time.perf_counter() - start)
        row.bot_images = len(latencies)
        row.bot_p50_ms = ms(quantile(latencies, 0.5))
        await service.wait_idle()
        failed = [e for e in endings(hub).values() if e.kind == "failed"]
        if failed:
            row.status = "failed"
            row.note = f"{len(failed)} job(s) failed in the bot path: {failed[0].data}"


def measure_row(
    run: Run, name: str, apply: Callable[[], None] | None, undo: Callable[[], None] | None
) -> Row:
    """Apply a configuration, measure raw, split and bot path, undo it; never raises."""
    row = Row(name=name)
    if run.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    try:
        setup = time.perf_counter()
        if apply is not None:
            apply()
        _warm_up(run, row)  # compiles, autotunes and loads kernels
        row.setup_s = round(time.perf_counter() - setup, 2)
        if run.left() > 4 * run.per_image:
            _split(run, row)
        if run.left() > (2 * run.images + 3) * run.per_image:
            asyncio.run(_bot(run, row))  # the raw calls too, right before the burst
        else:
            _raw(run, row)
            row.status, row.note = "partial", "no time left for the bot path"
    except Exception as exc:
        row.status = "failed"
        row.note = first_line(exc)
        traceback.print_exc()
    finally:
        if undo is not None:
            try:
                undo()
            except Exception:
                traceback.print_exc()
    if run.device == "cuda":
        import torch

        row.peak_gpu_gb = round(torch.cuda.max_memory_allocated() / _GB, 2)
    gc.collect()
    return row


# ---------------------------------------------------------------------------- the speed-ups


def _attention_rows(run: Run, requested: set[str]) -> list[tuple[str, Callable[[], None] | None, str]]:
    """(name, apply, why unavailable) for each attention backend asked for."""
    rows: list[tuple[str, Callable[[], None] | None, str]] = []
    if run.device != "cuda":
        wanted = [b for b in ATTENTION_BACKENDS if {"attention", f"attention {b}", b} & requested]
        return [("attention backends", None, "need CUDA")] if wanted else []
    for backend in ATTENTION_BACKENDS:
        name = f"attention {backend}"
        if not ({"attention", name, backend} & requested):
            continue

        def apply(backend: str = backend) -> None:
            run.pipe.transformer.set_attention_backend(backend)

        rows.append((name, apply, ""))
    return rows


def _reset_attention(run: Run) -> None:
    # "native" both resets the processors and the process-wide active backend
    run.pipe.transformer.set_attention_backend("native")


def _compile(run: Run) -> None:
    run.pipe.transformer.compile_repeated_blocks(fullgraph=True)


def _uncompile(run: Run) -> None:
    import torch

    for module in run.pipe.transformer.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    torch._dynamo.reset()


def _fp8(run: Run) -> None:
    import torch

    run.pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=run.dtype)


@dataclass(frozen=True, slots=True, kw_only=True)
class TierRow:
    """A configuration loaded through the bot's own ``load_pipeline`` from the saved pipeline."""

    key: str
    name: str
    quantize: str = "auto"
    compile: bool = False
    budget_gb: float | None = None
    cuda_only: bool = True


TIER_ROWS = (
    TierRow(key="int8", name="QUANTIZE=int8", quantize="int8", cuda_only=False),
    TierRow(key="fp8w", name="QUANTIZE=fp8", quantize="fp8"),
    TierRow(key="nf4", name="QUANTIZE=nf4", quantize="nf4"),
    TierRow(key="fp8w-compile", name="QUANTIZE=fp8, COMPILE=true", quantize="fp8", compile=True),
    TierRow(key="budget16", name="16 GiB budget, QUANTIZE=auto", budget_gb=16),
    TierRow(key="budget8", name="8 GiB budget, QUANTIZE=auto", budget_gb=8),
)
#: loading a tier (from the saved folder, quantizing on the way) may take this long, on top of its calls
TIER_LOAD_ALLOWANCE_S = 90.0


def _wanted_tiers(requested: set[str]) -> list[TierRow]:
    return [t for t in TIER_ROWS if {"tiers", t.key} & requested]


def _save_pipeline(run: Run) -> Path:
    """The built pipeline written once as a diffusers folder, for the tiers' real loading path."""
    folder = run.folder / "saved"
    if not (folder / "model_index.json").is_file():
        run.pipe.pipe.save_pretrained(folder)
    return folder


def measure_tier(run: Run, tier: TierRow, saved: Path) -> Row:
    """Load ``saved`` with the tier's settings through ``load_pipeline``, measure it, free it; never raises."""
    from bot.config import Quantize
    from generation.loading import load_pipeline

    if tier.cuda_only and run.device != "cuda":
        return Row(name=tier.name, status="unavailable", note="needs CUDA")
    import torch

    settings = bench_settings(
        run.folder / f"tier-{tier.key}", model=str(saved), device=run.device, jobs=run.images + 1,
        quantize=Quantize(tier.quantize), compile=tier.compile,
    )  # fmt: skip
    free_fn = None
    if tier.budget_gb is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        budget = int(tier.budget_gb * _GB)
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
        free_fn = lambda: budget - torch.cuda.memory_allocated()  # noqa: E731
    pipe: Any = None
    try:
        started = time.perf_counter()
        pipe, _profile, plan = load_pipeline(settings, profile=run.profile, free_bytes_fn=free_fn)
        load_s = time.perf_counter() - started
        tier_run = dataclasses.replace(run, pipe=TimedPipeline(pipe), plan=plan)
        row = measure_row(tier_run, tier.name, None, None)
        row.note = f"{plan.tier}; loaded in {load_s:.0f} s" + (f"; {row.note}" if row.note else "")
        return row
    except Exception as exc:
        traceback.print_exc()
        return Row(name=tier.name, status="unavailable", note=first_line(exc))
    finally:
        del pipe
        gc.collect()
        if run.device == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()


def all_rows(
    run: Run, requested: set[str], explicit: bool, on_row: Callable[[list[Row]], object] | None = None
) -> list[Row]:
    """Measure every requested row that fits the budget, in an order where each undoes cleanly.

    ``on_row`` sees the rows so far after each one, so a run stopped from outside keeps them.
    """
    rows: list[Row] = []
    calls_per_row = run.warmup + 2 * run.images + 2 + 1 + run.images

    def fits(extra: float = 0.0) -> tuple[bool, str]:
        need = calls_per_row * run.per_image + extra
        return (
            run.left() > need,
            f"skipped: needs about {need:.0f} s, {max(0.0, run.left()):.0f} s left of --budget",
        )

    def record(row: Row) -> None:
        rows.append(row)
        print(
            f"[{time.monotonic() - run.started:6.1f} s] {row.name}: {row.status} {row.note}".rstrip(),
            flush=True,
        )
        if on_row is not None:
            on_row(rows)

    base = measure_row(run, "baseline", None, None)
    if base.raw_p50_ms:
        run.per_image = base.raw_p50_ms / 1000
    record(base)
    for name, apply, why in _attention_rows(run, requested):
        ok, reason = fits()
        if why or apply is None:
            record(Row(name=name, status="unavailable", note=why))
        elif not ok:
            record(Row(name=name, status="skipped", note=reason))
        else:
            row = measure_row(run, name, apply, lambda: _reset_attention(run))
            if row.status == "failed":
                row.status = "unavailable"  # a backend that cannot run this model is not a crash of ours
            record(row)
    if "compile" in requested:
        ok, reason = fits(COMPILE_ALLOWANCE_S)
        if (run.device != "cuda" or run.spec.model == TINY.model) and not explicit:
            # compiling takes a minute or more: worth it for the real model on a GPU only
            why = "CPU" if run.device != "cuda" else "tiny model"
            record(
                Row(
                    name="torch.compile repeated blocks",
                    status="skipped",
                    note=f"{why}: ask with --rows compile",
                )
            )
        elif not ok:
            record(Row(name="torch.compile repeated blocks", status="skipped", note=reason))
        else:
            record(
                measure_row(
                    run, "torch.compile repeated blocks", lambda: _compile(run), lambda: _uncompile(run)
                )
            )
    tiers = _wanted_tiers(requested)
    # saved before the fp8 casting below, which is not undone: the tiers load the bf16 weights
    saved = _save_pipeline(run) if tiers else None
    if "fp8" in requested:  # casting the weights to fp8 is not undone
        ok, reason = fits(run.images * run.per_image)
        if not ok:
            record(Row(name="fp8 layerwise casting", status="skipped", note=reason))
        else:
            record(measure_row(run, "fp8 layerwise casting", lambda: _fp8(run), None))
    if saved is not None:
        # last: the built pipeline is freed, so each tier has the device to itself
        run.pipe.pipe = None
        gc.collect()
        if run.device == "cuda":
            import torch

            torch.cuda.empty_cache()
        for tier in tiers:
            ok, reason = fits(TIER_LOAD_ALLOWANCE_S + (COMPILE_ALLOWANCE_S if tier.compile else 0.0))
            if not ok and not (tier.cuda_only and run.device != "cuda"):
                record(Row(name=tier.name, status="skipped", note=reason))
            else:
                record(measure_tier(run, tier, saved))
    return rows


# ---------------------------------------------------------------------------- report


def render(result: dict[str, Any]) -> str:
    """The two tables: latency and throughput per row, then where the time goes."""
    c = result["config"]
    head = (
        f"brushbot GPU benchmark: {c['model']}, {c['size']}x{c['size']}, {c['steps']} steps, guidance 0, "
        f"{c['dtype']} on {c['device']}; {c['images']} images per measurement after {c['warmup']} warm-up; "
        f"weights {fmt(result['weights_gb'])} GiB, built in {fmt(result['build_s'], 1)} s\n"
        f"{describe(result['machine'])}"
    )
    rows = result["rows"]
    first = table(
        ["configuration", "status", "raw p50 ms", "bot p50 ms", "bot/raw thr.", "steady", "GPU gap med/max ms",
         "loop lag p99 ms", "peak GPU GiB", "first image s", "setup s"],
        [
            [r["name"], r["status"], fmt(r["raw_p50_ms"], 1), fmt(r["bot_p50_ms"], 1), fmt(r["throughput_ratio"], 3),
             fmt(r["steady_ratio"], 3),
             f"{fmt(r['gpu_idle_gap_median_ms'])} / {fmt(r['gpu_idle_gap_max_ms'])}", fmt(r["loop_lag_p99_ms"]),
             fmt(r["peak_gpu_gb"]), fmt(r["first_image_s"], 2), fmt(r["setup_s"], 1)]
            for r in rows
        ],
    )  # fmt: skip
    split_rows = [r for r in rows if r["split_ms"]]
    second = table(
        ["configuration", "text enc ms", "denoise ms", "VAE decode ms", "to PIL ms", "PNG encode ms", "finite"],
        [
            [r["name"], *(fmt(r["split_ms"].get(k), 1) for k in
                          ("text_encoding", "denoising", "vae_decode", "to_pil", "png_encode")),
             "—" if r["finite"] is None else "yes" if r["finite"] else "NO"]
            for r in split_rows
        ],
    )  # fmt: skip
    notes = [f"  {r['name']}: {r['note']}" for r in rows if r["note"]]
    legend = (
        "raw/bot p50: one image, queue empty (bot: submit to delivered, PNG saved). bot/raw thr.: a burst of "
        "the same images through the bot against the raw calls made right before it, both by the wall clock; "
        f"steady: the GPU thread's pace during the burst (goal ≥ {GPU_RATIO_GOAL} on a GPU)."
    )
    tail = ("\nnotes:\n" + "\n".join(notes)) if notes else ""
    return f"{head}\n\n{first}\n{legend}\n\n{second}{tail}\n\ntotal {fmt(result['total_s'], 1)} s of --budget {c['budget']:.0f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model (CPU-friendly): tests and dry runs")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--images", type=int, help="images per measurement (default 10; 3 with --tiny)")
    parser.add_argument("--warmup", type=int, help="warm-up calls per row (default 2; 1 with --tiny)")
    parser.add_argument("--size", type=int, help="image side (default 1024; 64 with --tiny)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (default 420)")
    parser.add_argument(
        "--rows",
        help="comma-separated: attention (or one backend name), compile, fp8, tiers (or one of int8, fp8w, "
        "nf4, fp8w-compile, budget16, budget8); the baseline always runs (default: all, but compile only "
        "for the full-size model on a GPU unless named here)",
    )
    parser.add_argument("--out", help="folder for gpu.json and gpu.txt (default $OUT or outputs/benchmarks)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    quiet_logs()
    # "Attention backends are an experimental feature" on every switch: once is enough
    import logging

    logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)

    import torch

    spec = TINY if args.tiny else FULL
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if device == "cpu" and not args.tiny:
        parser.error("the full-size model needs a CUDA device; use --tiny on a CPU")
    if args.size:
        spec = dataclasses.replace(spec, size=args.size)
    images = args.images or (3 if args.tiny else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    requested = {
        part.strip() for part in (args.rows or "attention,compile,fp8,tiers").split(",") if part.strip()
    }
    out_dir = Path(args.out) if args.out else results_path("gpu.json", None).parent
    if device == "cpu":
        torch.set_num_threads(1)  # the other core encodes PNGs, as in the CPU benchmarks

    from bot.config import DType, Offload
    from generation.loading import LoadPlan
    from generation.presets import resolve_profile

    with tempfile.TemporaryDirectory(prefix="brushbot-gpu-") as tmp:
        folder = Path(tmp)
        built = time.monotonic()
        pipe = build_pipeline(spec, device, dtype)
        build_s = time.monotonic() - built
        run = Run(
            spec=spec, device=device, dtype=dtype, pipe=TimedPipeline(pipe), folder=folder, images=images,
            warmup=warmup, started=started, deadline=started + args.budget, per_image=2.0 if device == "cuda" else 0.5,
            plan=LoadPlan(device=device, dtype=DType.BFLOAT16 if device == "cuda" else DType.FLOAT32,
                          offload=Offload.NONE, reason="benchmark: built in memory with random weights"),
            profile=resolve_profile(spec.model),
        )  # fmt: skip
        result: dict[str, Any] = {
            "benchmark": "gpu",
            "machine": machine(),
            "config": {
                "model": spec.name,
                "size": spec.size,
                "steps": spec.steps,
                "device": device,
                "dtype": str(dtype).removeprefix("torch."),
                "images": images,
                "warmup": warmup,
                "budget": args.budget,
                "rows": sorted(requested),
            },
            "weights_gb": weights_gb(pipe),
            "build_s": round(build_s, 2),
            "goal": {"throughput_ratio": GPU_RATIO_GOAL},
        }

        def save(rows: list[Row]) -> str:
            result["rows"] = [_row_json(r) for r in rows]
            result["total_s"] = round(time.monotonic() - started, 1)
            text = render(result)
            write_json(out_dir / "gpu.json", result)
            (out_dir / "gpu.txt").write_text(text + "\n", encoding="utf-8")
            return text

        rows = all_rows(run, requested, explicit=args.rows is not None, on_row=save)
        text = save(rows)
    print("\n" + text, flush=True)
    print(f"\nJSON: {out_dir / 'gpu.json'}")
    return 0 if rows and rows[0].status in ("ok", "partial") else 1


def _row_json(row: Row) -> dict[str, Any]:
    return {name: getattr(row, name) for name in row.__dataclass_fields__}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())

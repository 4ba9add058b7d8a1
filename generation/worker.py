"""The local GPU worker: one thread owns the warm pipeline and runs jobs one at a time."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from bot.config import Offload, Settings
from bot.domain import DrawRequest, ModelProfile
from bot.errors import BotError, CancelledError, GenerationError, OutOfMemoryError, first_line
from bot.ports import Rendered, StepCallback
from generation.acceleration import warm_sizes
from generation.loading import LoadPlan, load_pipeline
from generation.presets import resolve_profile
from generation.sources import SourceStore, img2img_arguments, open_source

_log = logging.getLogger(__name__)

#: builds (pipeline, profile, plan) on the worker thread; ``load_pipeline`` with the worker's profile by default
PipelineFactory = Callable[[Settings], tuple[Any, ModelProfile, LoadPlan]]

#: denoising steps of each warm-up run: the step loop compiles on its first step, the rest reuse it
WARMUP_STEPS = 2
_OOM_MESSAGE = "The GPU ran out of memory for this image; try a smaller size or fewer images."
_STOPPED_MESSAGE = "The image generator is shutting down; try again later."
_FAILED_MESSAGE = "The image generator failed on this request."
_NO_IMG2IMG_MESSAGE = "This model cannot draw from a picture."


class _Interrupted(Exception):
    """Raised from the step callback to stop the denoising loop (cancel or shutdown)."""


@dataclass(slots=True, kw_only=True)
class _Job:
    request: DrawRequest
    seeds: tuple[int, ...]
    on_step: StepCallback
    cancel: threading.Event
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Rendered]
    #: image-to-image arguments (the fitted picture, the strength), prepared off the GPU thread
    extra: dict[str, Any] | None = None
    #: set when the awaiting coroutine went away: stop the work, nobody wants it
    abandoned: threading.Event = field(default_factory=threading.Event)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn`` on ``loop`` from the worker thread; a closed loop has nobody left to tell."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        _log.debug("event loop closed; dropped %s", getattr(fn, "__name__", fn))


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
            return True
    except ImportError:
        pass
    return "out of memory" in str(exc).lower()


def call_pipeline(
    pipe: Any,
    request: DrawRequest,
    seeds: tuple[int, ...],
    callback: Any | None = None,
    *,
    extra: Mapping[str, Any] | None = None,
) -> list[Any]:
    """Draw ``request`` with ``pipe`` (one CPU generator per seed); the PIL images, one per seed.

    The one place a pipeline is called: the worker and the benchmarks' raw baseline both use it.
    ``callback`` is diffusers' ``callback_on_step_end``; ``extra`` holds further pipeline
    arguments (``img2img_arguments`` for a request from a picture, with ``image_pipeline(pipe)``).
    """
    import torch

    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    kwargs: dict[str, Any] = {}
    # the negative prompt only matters with guidance; passing it without would be ignored anyway
    if request.guidance > 0 and request.negative_prompt:
        kwargs["negative_prompt"] = request.negative_prompt
    if callback is not None:
        kwargs["callback_on_step_end"] = callback
    if extra:
        kwargs.update(extra)
    output = pipe(
        prompt=request.prompt,
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        num_images_per_prompt=request.count,
        generator=generators,
        output_type="pil",
        **kwargs,
    )
    return list(output.images)


def image_pipeline(pipe: Any) -> Any:
    """The image-to-image pipeline sharing ``pipe``'s loaded weights (no extra GPU memory).

    ``AutoPipelineForImage2Image.from_pipe`` picks ``ZImageImg2ImgPipeline``, or the SD or
    SDXL one. Raises ``GenerationError`` for a pipeline that has no image-to-image sibling.
    """
    from diffusers import AutoPipelineForImage2Image

    try:
        image_pipe = AutoPipelineForImage2Image.from_pipe(pipe)
    except ValueError as exc:
        _log.warning("no image-to-image pipeline for %s: %s", type(pipe).__name__, first_line(exc))
        raise GenerationError(_NO_IMG2IMG_MESSAGE) from None
    image_pipe.set_progress_bar_config(disable=True)
    _log.info("image-to-image pipeline ready: %s", type(image_pipe).__name__)
    return image_pipe


class Worker:
    """A ``bot.ports.Generator`` running on this machine's GPU (or CPU).

    ``start()`` spawns one thread that loads the pipeline, warms it up and then owns it:
    no other thread ever touches the pipeline. Jobs go to that thread through a queue;
    results come back through an asyncio future resolved with ``call_soon_threadsafe``.
    An out-of-memory error or any other failure fails that job only; the thread goes on.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        name: str = "local",
        pipeline_factory: PipelineFactory | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        # known before loading, so the core can validate requests while the model loads
        self.profile: ModelProfile = resolve_profile(settings.model, cache_dir=settings.model_cache_dir)
        if settings.compile:
            warm_sizes(self.profile, settings.compile_sizes)  # a size the model cannot draw: refused now
            if not settings.warmup:
                _log.warning(
                    "COMPILE=true with WARMUP=false: the first request at each size waits for a compile"
                )
        self.plan: LoadPlan | None = None
        self.device: str | None = None
        self.load_seconds: float | None = None
        self._factory: PipelineFactory = pipeline_factory or functools.partial(
            load_pipeline, profile=self.profile
        )
        self._sources = SourceStore(settings.output_dir)
        #: the image-to-image pipeline, made from the warm one on first use (worker thread only)
        self._image_pipe: Any = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def thread_ident(self) -> int | None:
        """The identity of the thread that owns the pipeline (None before start)."""
        return self._thread.ident if self._thread is not None else None

    @property
    def running(self) -> bool:
        """Whether the worker thread is up and taking jobs."""
        return self._thread is not None and self._thread.is_alive() and not self._closing.is_set()

    async def start(self) -> None:
        """Start the worker thread and wait until the model is loaded (and warmed up).

        Raises what loading raised (``ConfigError`` for a model that cannot be loaded).
        """
        if self._thread is not None:
            raise RuntimeError("worker already started")
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._stopped = loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(loop, ready, self._stopped), name=f"brushbot-gpu-{self.name}", daemon=True
        )
        self._thread.start()
        try:
            await ready
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop the thread: the running job and any queued ones fail with ``GenerationError``."""
        if self._thread is None or self._closing.is_set():
            if self._stopped is not None:
                await asyncio.shield(self._stopped)
            return
        self._closing.set()
        self._jobs.put(None)
        if self._stopped is not None:
            await asyncio.shield(self._stopped)
        self._thread.join()  # it has already returned: only the OS thread remains to reap

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ---- the port ----------------------------------------------------------------------------

    async def generate(
        self,
        request: DrawRequest,
        seeds: tuple[int, ...],
        *,
        on_step: StepCallback,
        cancel: threading.Event,
    ) -> Rendered:
        """Run one job on the worker thread; ``on_step`` is called on this loop after each step."""
        if len(seeds) != request.count:
            raise ValueError(f"{request.count} images need {request.count} seeds, got {len(seeds)}")
        if not self.running:
            raise GenerationError(_STOPPED_MESSAGE)
        loop = asyncio.get_running_loop()
        # the picture is decoded and fitted on a helper thread: the GPU thread only draws
        extra = None if request.source is None else await asyncio.to_thread(self._source_arguments, request)
        job = _Job(
            request=request,
            seeds=seeds,
            on_step=on_step,
            cancel=cancel,
            loop=loop,
            future=loop.create_future(),
            extra=extra,
        )
        self._jobs.put(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.abandoned.set()
            raise

    # ---- the worker thread ---------------------------------------------------------------------

    def _run(
        self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None], stopped: asyncio.Future[None]
    ) -> None:
        pipe: Any = None
        try:
            started = time.perf_counter()
            try:
                pipe, profile, plan = self._factory(self.settings)
                self.profile, self.plan, self.device = profile, plan, plan.device
                self.load_seconds = time.perf_counter() - started
                if self.settings.warmup:
                    self._warm_up(pipe)
            except BaseException as exc:
                _log.exception("loading the model failed")
                error = (
                    exc
                    if isinstance(exc, BotError)
                    else GenerationError(f"Loading the model failed: {first_line(exc, 300)}")
                )
                _post(loop, _resolve, ready, None, error)
                return
            _log.info(
                "worker %s ready: %s, %s, in %.1f s",
                self.name,
                self.profile.name,
                plan.tier,
                self.load_seconds,
            )
            _post(loop, _resolve, ready, None, None)
            self._serve(pipe)
        finally:
            del pipe
            self._image_pipe = None
            self._free_memory()
            self._fail_pending()
            _post(loop, _resolve, stopped, None, None)

    def _serve(self, pipe: Any) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._closing.is_set():
                if job is not None:
                    _post(job.loop, _resolve, job.future, None, GenerationError(_STOPPED_MESSAGE))
                return
            self._run_job(pipe, job)

    def _fail_pending(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                _post(job.loop, _resolve, job.future, None, GenerationError(_STOPPED_MESSAGE))

    def _warm_up(self, pipe: Any) -> None:
        """Short runs before the first user: lazy set-up, and with COMPILE every size worth compiling.

        Without compilation one run at the default size. With it, one at each of the default
        size, the named sizes and ``COMPILE_SIZES``, so no chat user waits for a compile (a
        request at another size still works: it recompiles, or runs dynamic, on its first call).
        """
        p = self.profile
        compiled = self.plan is not None and self.plan.compile
        sizes = (
            warm_sizes(p, self.settings.compile_sizes) if compiled else [(p.default_width, p.default_height)]
        )
        started = time.perf_counter()
        for width, height in sizes:
            size_started = time.perf_counter()
            call_pipeline(
                pipe,
                DrawRequest(prompt="warm-up", width=width, height=height, steps=WARMUP_STEPS,
                            guidance=p.default_guidance),
                (0,),
                callback=None,
            )  # fmt: skip
            if compiled:
                _log.info("compiled %dx%d in %.1f s", width, height, time.perf_counter() - size_started)
        _log.info("warm-up took %.1f s (%d size(s))", time.perf_counter() - started, len(sizes))

    def _run_job(self, pipe: Any, job: _Job) -> None:
        if job.cancel.is_set() or job.abandoned.is_set():
            # cancelled or abandoned while queued: it never ran, so there is nothing to undo
            _post(job.loop, _resolve, job.future, None, CancelledError("Cancelled."))
            return
        started = time.perf_counter()
        result: Rendered | None = None
        error: BotError | None = None
        interrupted = False

        def on_step_end(p: Any, i: int, t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            _post(job.loop, job.on_step, i + 1, int(p.num_timesteps))
            if job.cancel.is_set() or job.abandoned.is_set() or self._closing.is_set():
                raise _Interrupted
            return {}

        try:
            target = pipe if job.extra is None else self._image_pipeline(pipe)
            images = call_pipeline(target, job.request, job.seeds, on_step_end, extra=job.extra)
            seconds = time.perf_counter() - started
            result = Rendered(images=images, seeds=job.seeds, seconds=seconds, timings={"total": seconds})
        except _Interrupted:
            interrupted = True
            error = (
                GenerationError(_STOPPED_MESSAGE) if self._closing.is_set() else CancelledError("Cancelled.")
            )
        except BotError as exc:  # a clear reason already (no image-to-image pipeline for this model)
            error = exc
        except Exception as exc:
            if _is_oom(exc):
                _log.warning(
                    "out of memory on %dx%d x%d", job.request.width, job.request.height, job.request.count
                )
                error = OutOfMemoryError(_OOM_MESSAGE)
            else:
                _log.exception("generation failed")
                error = GenerationError(_FAILED_MESSAGE)
        # outside the except blocks: the traceback (and the tensors its frames hold) is gone
        if interrupted:
            # stopped cleanly between two steps: the next job reuses the cached memory as it is;
            # only offload hooks left mid-way need putting back (shutdown frees the rest)
            if self.plan is not None and self.plan.offload is not Offload.NONE:
                self._free_hooks(pipe)
        elif error is not None:
            self._recover(pipe)
        _post(job.loop, _resolve, job.future, result, error)

    def _source_arguments(self, request: DrawRequest) -> dict[str, Any]:
        """The image-to-image arguments of ``request``, from its kept picture (blocking: a PNG decode)."""
        assert request.source is not None
        return img2img_arguments(request, open_source(self._sources.path(request.source)))

    def _image_pipeline(self, pipe: Any) -> Any:
        """The image-to-image pipeline, made from the warm one on first use (worker thread only)."""
        if self._image_pipe is None:
            self._image_pipe = image_pipeline(pipe)
        return self._image_pipe

    def _free_hooks(self, pipe: Any) -> None:
        """Put back the offload hooks an aborted run left mid-way (diffusers does it at a run's end)."""
        free_hooks = getattr(pipe, "maybe_free_model_hooks", None)
        if callable(free_hooks):
            with contextlib.suppress(Exception):
                free_hooks()

    def _recover(self, pipe: Any) -> None:
        """Undo what a failed run left behind: offload hooks mid-way and cached memory."""
        self._free_hooks(pipe)
        self._free_memory()

    def _free_memory(self) -> None:
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

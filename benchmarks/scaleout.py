"""Scale-out on Ray: throughput with 1, 2, 4 and 8 workers, scaling efficiency and dispatch overhead per job.

(a) simulated GPU workers: real ``GpuWorker`` actors whose pipeline sleeps its GPU time (each step
``--step`` seconds, the CPU stays free), so the numbers measure the pool, not the machine's cores.
(b) real tiny-model workers for N = 1 and 2 (they compute on the CPU, so two cores bound them).
Every job goes the whole front-end path: submit → fair queue → dispatcher → Ray actor (progress
streamed back) → PNG encoded on the worker → saved with metadata → SQLite → a recording transport.

    efficiency(N) = throughput(N) / (N × throughput(1))
    overhead/job  = (wall − jobs × GPU time ÷ N) ÷ (jobs ÷ N)   (what each job adds on a worker)

    .venv/bin/python benchmarks/scaleout.py                 # N = 1,2,4,8 simulated, 1,2 tiny
    .venv/bin/python benchmarks/scaleout.py --workers 1,2 --no-tiny --jobs-per-worker 4
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: the repository root is not on sys.path yet
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True, slots=True)
class SleepingPipeline:
    """A pipeline factory whose pipeline sleeps ``step`` seconds a step: a GPU that leaves the CPU free."""

    step: float
    model_dir: str

    def __call__(self, settings: Any) -> tuple[Any, Any, Any]:
        from bot.config import DType, Offload
        from generation.loading import LoadPlan
        from generation.presets import resolve_profile

        profile = resolve_profile(self.model_dir)
        plan = LoadPlan(device="cpu", dtype=DType.FLOAT32, offload=Offload.NONE, reason="simulated GPU")
        return _Sleeper(self.step), profile, plan


class _Sleeper:
    def __init__(self, step: float) -> None:
        self.step = step
        self.num_timesteps = 0

    def set_progress_bar_config(self, **_: Any) -> None:
        pass

    def __call__(self, **kwargs: Any) -> Any:
        from PIL import Image

        steps = int(kwargs["num_inference_steps"])
        self.num_timesteps = steps
        callback = kwargs.get("callback_on_step_end")
        for i in range(steps):
            time.sleep(self.step)
            if callback is not None:
                callback(self, i, i, {})
        count = int(kwargs.get("num_images_per_prompt") or 1)
        size = (int(kwargs["width"]), int(kwargs["height"]))
        images = [Image.new("RGB", size, (i * 40 % 256, 90, 160)) for i in range(count)]
        return type("Output", (), {"images": images})()


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    kind: str
    workers: int
    jobs: int
    wall: float
    gpu_per_job: float  # measured on the workers (mean)

    @property
    def throughput(self) -> float:
        return self.jobs / self.wall

    @property
    def overhead(self) -> float:
        per_worker = self.jobs / self.workers
        return (self.wall - per_worker * self.gpu_per_job) / per_worker


async def run_pool(
    kind: str, n: int, jobs: int, *, folder: Path, model_dir: Path, factory: Any, steps: int
) -> Result:
    from bot.config import Settings
    from bot.domain import UserRef
    from bot.recording import RecordingHub
    from bot.service import Service
    from data import SqliteStore
    from generation.images import ImageStore
    from generation.ray_worker import RayPool

    run_dir = folder / f"{kind}-{n}"
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        model=str(model_dir),
        device="cpu",  # type: ignore[arg-type]
        workers="ray",  # type: ignore[arg-type]
        ray_workers=n,
        warmup=True,  # workers warm up before they take jobs, as in production
        db_path=run_dir / "bot.sqlite3",
        output_dir=run_dir / "out",
        model_cache_dir=folder / "cache",
        daily_credits=100_000,
        max_queued_per_user=1000,
        max_queued_total=100_000,
        progress_interval=0.5,
    )
    async with RayPool(
        settings, pipeline_factories=[factory] if factory else (), cpus_per_worker=0, progress_wait=0.5
    ) as pool:
        assert all(await asyncio.gather(*(w.ready() for w in pool.workers))), "a worker did not load"
        store = SqliteStore(settings.db_path)
        await store.start()
        hub = RecordingHub(platform="bench")
        service = Service(
            settings=settings,
            store=store,
            workers=pool.workers,
            sink=ImageStore(settings.output_dir, "bench"),
        )
        service.register(hub)
        gpu: list[float] = []
        real_learn = service._learn_speed

        def learn(job: Any, rendered: Any) -> None:
            gpu.append(rendered.seconds)
            real_learn(job, rendered)

        service._learn_speed = learn  # type: ignore[method-assign]
        users = [UserRef(platform="bench", id=f"u{i}") for i in range(max(4, 2 * n))]
        request = service.parse(f"a lighthouse at dusk --size 64x64 --steps {steps}")
        for i in range(jobs):
            await service.submit(users[i % len(users)], request, delivery={"chat": "c"})
        started = time.perf_counter()
        await service.start()
        await service.wait_idle()
        wall = time.perf_counter() - started
        delivered = len(hub.finished())
        await service.close()
        await store.close()
    if delivered != jobs:
        raise SystemExit(f"{kind} N={n}: {delivered} of {jobs} delivered")
    return Result(kind=kind, workers=n, jobs=jobs, wall=wall, gpu_per_job=sum(gpu) / len(gpu))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4,8", help="simulated pool sizes (default 1,2,4,8)")
    parser.add_argument("--jobs-per-worker", type=int, default=8)
    parser.add_argument("--step", type=float, default=0.05, help="simulated GPU seconds per step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--no-tiny", action="store_true", help="skip the real tiny-model workers")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.workers.split(",") if x.strip()]

    import ray

    from generation.tiny import build_tiny_pipeline

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # actors import this checkout (and this script's pipeline, pickled by value)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    started = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    print(f"ray {ray.__version__}: local cluster up in {time.perf_counter() - started:.1f} s, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="brushbot-scaleout-") as tmp:
        folder = Path(tmp)
        model_dir = build_tiny_pipeline(folder / "tiny")
        sleeper = SleepingPipeline(step=args.step, model_dir=str(model_dir))
        for n in sizes:
            results.append(
                asyncio.run(
                    run_pool(
                        "simulated", n, n * args.jobs_per_worker,
                        folder=folder, model_dir=model_dir, factory=sleeper, steps=args.steps,
                    )
                )
            )  # fmt: skip
        if not args.no_tiny:
            for n in (1, 2):
                results.append(
                    asyncio.run(
                        run_pool(
                            "tiny", n, n * args.jobs_per_worker,
                            folder=folder, model_dir=model_dir, factory=None, steps=args.steps,
                        )
                    )
                )  # fmt: skip
    ray.shutdown()
    one = {r.kind: r.throughput for r in results if r.workers == 1}
    print(f"\n{args.steps} steps a job at 64²; simulated GPU {args.step * args.steps:.2f} s a job")
    print(f"{'workers':>8} {'kind':>10} {'jobs':>5} {'wall s':>8} {'jobs/s':>8} {'efficiency':>10} "
          f"{'GPU s/job':>10} {'overhead/job':>13}")  # fmt: skip
    for r in results:
        eff = r.throughput / (r.workers * one[r.kind]) if r.kind in one else float("nan")
        print(f"{r.workers:>8} {r.kind:>10} {r.jobs:>5} {r.wall:>8.2f} {r.throughput:>8.2f} {eff:>10.2f} "
              f"{r.gpu_per_job:>10.3f} {r.overhead * 1000:>10.0f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

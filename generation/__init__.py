"""Model presets, loading, the warm GPU worker, image files and the tiny offline pipeline."""

from generation.images import ImageStore, read_parameters
from generation.loading import LoadPlan, decide_plan, load_pipeline, plan_device
from generation.presets import PRESETS, repo_for, resolve_profile
from generation.tiny import build_tiny_pipeline
from generation.worker import Worker

__all__ = [
    "PRESETS",
    "ImageStore",
    "LoadPlan",
    "Worker",
    "build_tiny_pipeline",
    "decide_plan",
    "load_pipeline",
    "plan_device",
    "read_parameters",
    "repo_for",
    "resolve_profile",
]

"""Worker-only settings: knobs of the engine that the web process never needs.

They extend the studio's :class:`~app.config.Settings` (same ``STUDIO_`` prefix, same sources), so a
worker reads one settings object. ``train_overrides`` is JSON in the environment, for example
``STUDIO_TRAIN_OVERRIDES='{"max_train_steps": 40, "checkpoint_every": 10}'``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from app import config as studio_config
from app.config import Settings

# Used when no base model is configured and CUDA is present (the tiny demo model runs without it).
DEFAULT_GPU_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class WorkerSettings(Settings):
    # Passed to the engine as JobSpec.train_overrides (TrainConfig field names); empty: the preset decides.
    train_overrides: dict[str, Any] = {}
    # Class-prior images per job, and sampler steps for the bank and the gallery; None: the engine decides.
    prior_images: int | None = None
    prior_steps: int | None = None
    sample_steps: int | None = None
    # A local cache of the shared class-prior bank (the bank itself lives in storage). Default var/prior-bank.
    prior_cache_dir: Path | None = None
    # Seconds between fenced progress writes to the database (stage changes always go out at once).
    progress_write_seconds: float = 1.0
    # Seconds between cancel-flag reads from the database while a job runs.
    cancel_poll_seconds: float = 1.0
    # How long a task keeps trying to claim its job while the database is unreachable, before it
    # hands its message back to the broker (to the end of the queue) and takes the next one.
    claim_retry_seconds: float = 300.0
    # How long a finished attempt keeps trying its final write (the gallery's rows) through a database outage.
    publish_retry_seconds: float = 120.0
    # The storage reconciler removes objects no row refers to once they are this old (a younger one may
    # belong to a transaction about to commit).
    orphan_min_age_seconds: int = 3600
    # PyTorch CPU threads of a worker (and of `studio train`); None or 0: measured from the cores the
    # process may use, leaving one to the web process and the database on a machine of up to 4 cores
    # (worker/engine/threads.py). Too many threads beside other CPU work make a job many times slower.
    worker_threads: int | None = None

    @property
    def resolved_worker_threads(self) -> int:
        from worker.engine.threads import choose_threads

        return choose_threads(self.worker_threads)

    @property
    def resolved_prior_cache_dir(self) -> Path:
        return (self.prior_cache_dir or self.var_dir / "prior-bank").resolve()


def worker_settings_from(settings: Settings) -> WorkerSettings:
    """``settings`` as WorkerSettings: the worker knobs come from the environment, the rest from ``settings``."""
    if isinstance(settings, WorkerSettings):
        return settings
    extra = WorkerSettings(secret_key=settings.secret_key, environment=settings.environment)
    values = settings.model_dump()
    values.update({name: getattr(extra, name) for name in WorkerSettings.model_fields if name not in values})
    return WorkerSettings.model_validate(values)


@lru_cache
def get_worker_settings() -> WorkerSettings:
    return worker_settings_from(studio_config.get_settings())

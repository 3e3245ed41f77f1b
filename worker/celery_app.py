"""The Celery app shared by the web process (which only sends tasks by name), the workers and beat.

Importing this module must never import torch: the web process imports it to send tasks, and the
task modules load the engine lazily inside their functions.

Reliability choices (see the job pipeline's docs): the database, not the broker, is the source of
truth. Tasks carry ids only; a worker claims its job with a fenced lease (app/jobs/lease.py), so a
duplicate delivery exits at the claim and a lost worker's job is re-queued by the reaper. The broker
settings below only make the broker's side as safe as it can be:

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a job whose worker dies is handed out again
  (the attempt cap in the database stops a job that kills its worker every time).
- ``worker_prefetch_multiplier = 1`` and one process per GPU: a worker holds only the job it runs.
- ``worker_max_tasks_per_child = 1``: every job starts in a fresh process, so GPU memory and model
  caches never leak from one job into the next.
- ``visibility_timeout`` (Redis re-delivers an unacknowledged task after it) comes from settings and
  is built here, in one function, for every process: the shortest value used anywhere wins.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from celery import Celery
from celery.exceptions import CPendingDeprecationWarning
from celery.schedules import crontab
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_after_setup,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)
from celery.worker.control import control_command

from app import config as studio_config
from app.config import Settings
from worker.engine.threads import apply_threads, thread_environment, usable_cpus

log = logging.getLogger(__name__)

GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"

# Task name prefixes and the queue each goes to. Names are "domain.verb"; the web sends them by name.
TASK_QUEUES: dict[str, str] = {
    "training.*": GPU_QUEUE,
    "generation.*": GPU_QUEUE,
    "priors.*": GPU_QUEUE,  # the operator's prior-bank fill: it paints with the base model
    "maintenance.*": CPU_QUEUE,
    "mail.*": CPU_QUEUE,
    "accounts.*": CPU_QUEUE,
}

TASK_MODULES = ("worker.tasks.training", "worker.tasks.generation", "worker.tasks.maintenance",
                "worker.tasks.mail", "worker.tasks.accounts", "worker.tasks.priors")

REAP_EVERY_SECONDS = 30.0
SWEEP_SCRATCH_COMMAND = "studio_sweep_scratch"


def queue_for(task_name: str) -> str:
    """The queue a task name is routed to; raises ValueError for a name no route covers."""
    domain = task_name.split(".", 1)[0]
    queue = TASK_QUEUES.get(f"{domain}.*")
    if queue is None or "." not in task_name:
        expected = ", ".join(repr(pattern) for pattern in TASK_QUEUES)
        raise ValueError(f"unknown task name {task_name!r}: expected one of {expected}")
    return queue


def filesystem_broker_folders(settings: Settings) -> dict[str, Path]:
    """The folders kombu's file-system transport uses under ``settings.broker_dir``.

    Producer and consumer share one config, so messages are written to and read from the same folder.
    """
    root = settings.broker_dir
    return {
        "data_folder_in": root / "queue",
        "data_folder_out": root / "queue",
        "processed_folder": root / "processed",
        "control_folder": root / "control",
    }


def build_config(settings: Settings) -> dict[str, Any]:
    """Celery's configuration for every process (web, worker, beat), from the studio's settings."""
    transport_options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout}
    broker_url = settings.resolved_broker_url
    if broker_url.startswith("filesystem://"):
        folders = filesystem_broker_folders(settings)
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        transport_options.update({name: str(path) for name, path in folders.items()})
        transport_options["store_processed"] = False
    return {
        "broker_url": broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Celery 6 turns this on by default: on a lost broker connection, every running late-acked
        # task is cancelled. A Redis blip (a restart, a failover, a network hiccup) would then kill
        # every training in flight and throw its work since the last checkpoint away. Here the
        # database lease protects the job, not the broker: the run goes on, and should its message
        # be handed out again meanwhile, that delivery finds the lease alive and exits at the claim.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_default_queue": CPU_QUEUE,
        "task_routes": {pattern: {"queue": queue} for pattern, queue in TASK_QUEUES.items()},
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_hard_time_limit,
        "worker_prefetch_multiplier": 1,
        "worker_max_tasks_per_child": 1,
        "worker_pool": "prefork",
        "worker_concurrency": 1,
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
        "enable_utc": True,
        "beat_schedule_filename": str((settings.var_dir / "celerybeat-schedule").resolve()),
        "beat_schedule": {
            "reap-stale-jobs": {"task": "maintenance.reap", "schedule": REAP_EVERY_SECONDS},
            "enforce-retention": {"task": "maintenance.retention", "schedule": crontab(minute="7")},
            "reconcile-storage": {"task": "maintenance.reconcile_storage", "schedule": crontab(minute="37")},
        },
    }


def create_celery(settings: Settings | None = None) -> Celery:
    """A Celery app configured from ``settings``; without them, from the process's settings on first use.

    The configuration is lazy so that importing this module reads no settings and creates no folders.
    """
    app = Celery("studio", include=list(TASK_MODULES))
    if settings is not None:
        app.conf.update(build_config(settings))
    else:
        app.add_defaults(lambda: build_config(studio_config.get_settings()))
    return app


# The app the `celery -A worker.celery_app worker|beat` command lines load.
celery_app = create_celery()


@celeryd_after_setup.connect
def quiet_the_cancel_on_connection_loss_warning(**_: Any) -> None:
    """Drop Celery's warning, on every lost broker connection, that the default of
    ``worker_cancel_long_running_tasks_on_connection_loss`` changes in Celery 6.0: build_config
    sets it on purpose. Installed after the worker set up its logging, which turns those warnings on."""
    warnings.filterwarnings("ignore", message=r"(?s).*worker_cancel_long_running_tasks_on_connection_loss",
                            category=CPendingDeprecationWarning)


def serves_jobs(worker: Any) -> bool:
    """Whether a starting worker consumes the job queue (a maintenance-only worker needs no engine)."""
    try:
        queues = set(worker.app.amqp.queues.consume_from)
    except AttributeError:
        return True
    return not queues or GPU_QUEUE in queues


@after_setup_logger.connect
@after_setup_task_logger.connect
def json_log_lines(logger: logging.Logger | None = None, **_: Any) -> None:
    """With ``STUDIO_LOG_JSON``, the worker's log lines are JSON objects too (app.logs)."""
    if logger is not None and studio_config.get_settings().log_json:
        from app.logs import format_as_json

        format_as_json(logger)


@worker_init.connect
def preload_engine(sender: Any = None, **_: Any) -> None:
    """Import the engine once in a worker's main process, before its pool forks.

    Every job runs in a fresh child (``worker_max_tasks_per_child = 1``); forked from a parent that
    already imported torch and diffusers, a child starts in milliseconds instead of seconds. Only
    imports happen here: CUDA is initialised in the child that runs the job, never in the parent.
    """
    if sender is not None and not serves_jobs(sender):
        return  # maintenance only: no torch, so the process stays small
    # CUDA must not be initialised before a fork; with this, torch.cuda.is_available() asks NVML instead.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    threads = _worker_threads()
    # Before torch's first import, so that its OpenMP pool starts at this size (and the jobs' children inherit it).
    os.environ.update(thread_environment(threads))
    try:
        import torch

        import worker.engine.job  # noqa: F401
    except ImportError:
        log.warning("the engine could not be preloaded; each job will import it itself", exc_info=True)
        return
    apply_threads(threads)
    if torch.cuda.is_initialized():
        log.error("CUDA was initialised in the worker's main process; forked jobs may fail to use the GPU")


def _worker_threads() -> int:
    from worker.settings import get_worker_settings

    return get_worker_settings().resolved_worker_threads


@worker_process_init.connect
def size_the_job_threads(**_: Any) -> None:
    """A job's process (forked from the preloaded parent) runs with the worker's thread count too."""
    if "torch" in sys.modules:
        apply_threads(_worker_threads())


@worker_ready.connect
def report_threads(**_: Any) -> None:
    """Say in the worker's log (set up by now) how many CPU threads its jobs use."""
    torch = sys.modules.get("torch")
    if torch is not None:
        log.info("jobs use %d PyTorch CPU thread(s) of %d usable core(s) (STUDIO_WORKER_THREADS sets it)",
                 torch.get_num_threads(), usable_cpus())


@worker_ready.connect
def sweep_scratch_at_start(**_: Any) -> None:
    """Remove the scratch folders this host's killed workers left (copies of photos, crops, checkpoints)."""
    from worker.scratch import sweep_scratch

    try:
        sweep_scratch(studio_config.get_settings().scratch_dir)
    except OSError:
        log.warning("the scratch sweep at start failed; the reaper's sweep will try again", exc_info=True)


_heartbeat: Any = None


def consumed_queues(consumer: Any) -> list[str]:
    """The names of the queues a worker consumes (from its ``worker_ready`` sender)."""
    try:
        return sorted(queue.name for queue in consumer.task_consumer.queues)
    except AttributeError:
        return sorted(consumer.app.amqp.queues.consume_from or {})


@worker_ready.connect
def start_worker_heartbeat(sender: Any = None, **_: Any) -> None:
    """Record this worker in ``worker_heartbeats`` every ``heartbeat_seconds`` (worker.heartbeat), from its
    main process, for as long as it lives."""
    global _heartbeat
    from worker.heartbeat import Heartbeat, private_sessions

    settings = studio_config.get_settings()
    queues = consumed_queues(sender) if sender is not None else []
    _heartbeat = Heartbeat(private_sessions(settings.resolved_database_url), queues,
                           float(settings.heartbeat_seconds)).start()


@worker_shutdown.connect
def stop_worker_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


@control_command(name=SWEEP_SCRATCH_COMMAND)  # type: ignore[untyped-decorator]
def sweep_scratch_command(state: Any, **_: Any) -> dict[str, list[str]]:
    """Remote control: every worker removes its host's scratch folders of dead attempts (sent at deletion).

    It runs in the worker's main process, which is the one process of the worker that is alive whatever
    happened to its children, and needs no database: a folder goes only when its owner is provably dead.
    """
    from worker.scratch import sweep_scratch

    return {"removed": sweep_scratch(studio_config.get_settings().scratch_dir)}


def broadcast_scratch_sweep(app: Celery | None = None) -> None:
    """Ask every running worker, on every host, to sweep its scratch folder (fire and forget)."""
    (app or celery_app).control.broadcast(SWEEP_SCRATCH_COMMAND)

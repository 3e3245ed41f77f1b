"""The Celery configuration every process shares."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app.config import Settings
from worker.celery_app import CPU_QUEUE, GPU_QUEUE, build_config, create_celery, queue_for


def test_the_config_is_safe_for_long_gpu_jobs(settings: Settings) -> None:
    config = build_config(settings)
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1 and config["worker_max_tasks_per_child"] == 1
    assert config["worker_concurrency"] == 1 and config["worker_pool"] == "prefork"
    assert config["task_soft_time_limit"] == settings.task_soft_time_limit
    assert config["task_time_limit"] == settings.task_hard_time_limit
    assert config["broker_transport_options"]["visibility_timeout"] == settings.visibility_timeout
    assert config["task_serializer"] == config["result_serializer"] == "json"
    assert config["accept_content"] == ["json"] and config["task_ignore_result"] is True
    assert {entry["task"] for entry in config["beat_schedule"].values()} == {
        "maintenance.reap", "maintenance.retention", "maintenance.reconcile_storage"}


def test_the_file_system_broker_gets_its_folders(settings: Settings) -> None:
    options = build_config(settings)["broker_transport_options"]
    assert options["data_folder_in"] == options["data_folder_out"]
    for name in ("data_folder_in", "processed_folder", "control_folder"):
        assert options[name].startswith(str(settings.broker_dir))
    assert (settings.broker_dir / "queue").is_dir()


def test_redis_uses_the_same_visibility_timeout_and_no_folders(settings: Settings) -> None:
    redis_settings = settings.model_copy(update={"broker_url": "redis://127.0.0.1:6379/0"})
    options = build_config(redis_settings)["broker_transport_options"]
    assert options == {"visibility_timeout": settings.visibility_timeout}


def test_tasks_are_routed_by_name(settings: Settings) -> None:
    assert queue_for("training.run") == GPU_QUEUE and queue_for("generation.run") == GPU_QUEUE
    assert queue_for("maintenance.reap") == CPU_QUEUE
    with pytest.raises(ValueError, match="unknown task name"):
        queue_for("training")
    app = create_celery(settings)
    assert app.amqp.router.route({}, "training.run")["queue"].name == GPU_QUEUE


def test_importing_the_app_and_the_tasks_leaves_torch_out() -> None:
    code = ("import sys, worker.celery_app, worker.tasks.training, worker.tasks.generation, "
            "worker.tasks.maintenance; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"


def test_the_worker_registers_every_task_name(settings: Settings) -> None:
    app = create_celery(settings)
    app.loader.import_default_modules()
    import worker.tasks.generation  # noqa: F401
    import worker.tasks.maintenance  # noqa: F401
    import worker.tasks.training  # noqa: F401
    from worker.celery_app import celery_app

    names = set(celery_app.tasks)
    assert {"training.run", "generation.run", "maintenance.reap", "maintenance.retention",
            "maintenance.purge_subject", "maintenance.reconcile_storage"} <= names


def test_a_lost_broker_connection_does_not_cancel_running_jobs(settings: Settings) -> None:
    # Set on purpose, not left to Celery's default (True from Celery 6): the database lease protects
    # a running job, and a Redis blip must not kill every training in flight.
    assert build_config(settings)["worker_cancel_long_running_tasks_on_connection_loss"] is False
    app = create_celery(settings)
    assert app.conf.worker_cancel_long_running_tasks_on_connection_loss is False

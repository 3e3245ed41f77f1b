"""Worker processes as their heartbeats record them, for the operator console, /readyz and /metrics."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import JSON, BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, utcnow


class WorkerHeartbeat(Base):
    """One Celery worker (its long-lived main process), upserted every few seconds by that process.

    ``name`` is "host:pid" of the main process. The job child that process forks writes
    ``current_job_id`` and ``steps_per_second`` on its parent's row (``host:ppid``), so the row says
    what the worker runs and how fast it trained last, across Celery's one-process-per-task model.
    A row whose ``last_seen_at`` is older than a few heartbeats belongs to a lost worker.
    """

    __tablename__ = "worker_heartbeats"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int]
    queues: Mapped[list[str]] = mapped_column(JSON, default=list)
    gpu_name: Mapped[str | None] = mapped_column(String(255), default=None)
    gpu_memory_used_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    gpu_memory_total_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    gpu_utilisation: Mapped[float | None] = mapped_column(default=None)  # percent, 0–100
    current_job_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    steps_per_second: Mapped[float | None] = mapped_column(default=None)  # training speed, current or last job
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

"""Jobs: the unit of work the GPU workers claim, with their lease, progress and outcome."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, TimestampMixin, utcnow

JOB_KINDS = ("train", "generate")
JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running")
# Stages in the order a training job passes them; "generate" jobs use only sampling and publishing.
JOB_STAGES = ("queued", "preparing", "priors", "training", "sampling", "scoring", "publishing", "finished")


class Job(IdMixin, TimestampMixin, Base):
    """A training or "generate more" job of one subject.

    The database, not the broker, is the source of truth: a worker claims a queued job with one
    conditional UPDATE that writes a fresh ``lease_token`` and bumps ``attempts``; every later write
    of progress and the final publish is fenced by that token.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_created_at", "status", "created_at"),
        # The queue position: queued jobs in the order their messages were sent.
        Index("ix_jobs_status_enqueued_at", "status", "enqueued_at"),
    )

    subject_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"), index=True)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="train")
    status: Mapped[str] = mapped_column(String(16), default="queued")
    stage: Mapped[str] = mapped_column(String(16), default="queued")
    step: Mapped[int] = mapped_column(default=0)
    total: Mapped[int] = mapped_column(default=0)
    loss: Mapped[float | None] = mapped_column(default=None)
    eta_seconds: Mapped[float | None] = mapped_column(default=None)
    # Per-stage facts for the page: prior images generated/reused, images sampled, preview keys...
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    preview_keys: Mapped[list[str]] = mapped_column(JSON, default=list)

    attempts: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    lease_token: Mapped[str | None] = mapped_column(String(64), default=None)
    # Who holds the lease, "host:pid": a later delivery on the same host that finds this process
    # dead takes the job over at once instead of waiting for the lease to go stale.
    lease_holder: Mapped[str | None] = mapped_column(String(255), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    cancel_requested: Mapped[bool] = mapped_column(default=False)

    # When the broker took the job's latest message; empty while none is known to be waiting.
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    failure_reason: Mapped[str | None] = mapped_column(Text, default=None)


class GenerationRequest(IdMixin, TimestampMixin, Base):
    """'Generate more': new prompts on an already trained subject, run by a job of kind 'generate'."""

    __tablename__ = "generation_requests"

    subject_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    prompts: Mapped[list[str]] = mapped_column(JSON, default=list)
    images_per_prompt: Mapped[int] = mapped_column(default=4)

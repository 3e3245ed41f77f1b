"""What the job status endpoint returns; the studio page's script reads exactly these fields."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

StepState = Literal["pending", "active", "done", "failed", "cancelled"]


class StageProgress(BaseModel):
    """One step of the stepper on the studio page."""

    key: str = Field(description="queued, preparing, priors, training, generating or done")
    title: str
    state: StepState
    fraction: float = Field(ge=0.0, le=1.0, description="how far this stage is, 0..1")
    detail: str = Field(description='a short note: "3rd in line", "reused 50", "120/400", "7/40"')


class JobStatus(BaseModel):
    id: uuid.UUID
    subject_id: uuid.UUID
    kind: str = Field(description="train or generate")
    status: str = Field(description="queued, running, done, failed or cancelled")
    stage: str = Field(description="queued, preparing, priors, training, sampling, scoring, publishing, finished")
    stage_label: str = Field(description="where the job is, as a sentence a person reads")
    finished: bool = Field(description="true once done, failed or cancelled: polling can stop")
    step: int
    total: int
    fraction: float = Field(ge=0.0, le=1.0, description="overall progress across every stage, 0..1")
    stages: list[StageProgress]
    loss: float | None
    loss_history: list[float] = Field(description="recent training losses, oldest first (may be empty)")
    eta_seconds: float | None = Field(description="seconds until the job is done, the wait in line included; "
                                                  "null when unknown or finished")
    queue_wait_seconds: float | None = Field(default=None, description="seconds until a worker takes a queued "
                                                                       "job; null unless queued and known")
    queue_position: int | None = Field(description="1 means next in line; null unless queued")
    attempts: int
    max_attempts: int
    cancel_requested: bool
    preview_urls: list[str]
    failure_reason: str | None
    demo_model: bool = Field(description="the job ran on the built-in demo model: noise-like pictures")
    notes: list[str] = Field(default_factory=list, description="things worth knowing about this run, as sentences")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

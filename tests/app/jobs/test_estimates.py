"""Time estimates: speeds measured from finished studios, a job's plan, the time left and the wait in line."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session

from app.config import Settings
from app.jobs import estimates, service
from app.models import Job, Subject, User, utcnow
from tests.app.factories import make_job, make_subject, make_user

# A finished "balanced" pet studio on the demo model: 40 class pictures in 8 s, 500 steps in 20 s,
# 40 gallery pictures in 6 s (+ 2 s of scoring), 3 s preparing, 35 s from start to finish (so 2 s publishing).
FINISHED_DETAILS: dict[str, Any] = {
    "base_model": "tiny", "base_model_key": None, "demo_model": True, "family": "sd",
    "prior_generated": 40, "prior_reused": 0, "train_steps": 500, "images_total": 40,
    "stage_seconds": {"preparing": 3.0, "priors": 8.0, "training": 20.0, "sampling": 6.0, "scoring": 2.0},
}


def finished_studio(session: Session, owner: User, class_noun: str = "dog", **details: Any) -> Job:
    subject = make_subject(session, owner, class_noun=class_noun)
    started = utcnow() - timedelta(minutes=5)
    return make_job(session, subject, status="done", stage="finished", started_at=started,
                    finished_at=started + timedelta(seconds=41), details={**FINISHED_DETAILS, **details})


def test_a_plan_multiplies_the_recipe_by_the_speeds_measured_on_the_same_model(
        db_session: Session, settings: Settings) -> None:
    owner = make_user(db_session)
    finished_studio(db_session, owner)
    cat = make_subject(db_session, owner, kind="cat", class_noun="cat", quality="balanced",
                       style_pack="pet-adventures", prompts=["{subject} on a boat"], images_per_prompt=2)
    settings.base_model = "tiny"

    plan = estimates.plan_training(db_session, settings, cat)

    assert plan is not None and plan["measured_jobs"] == 1
    # 40 class pictures at 0.2 s (the demo model's cap of the recipe's 200), 500 steps at 0.04 s, and
    # (pack + 1 own prompt) x 2 pictures at 0.2 s plus the 2 s of publishing.
    pack_prompts = len(estimates.STYLE_PACKS["pet-adventures"].prompts)
    assert plan["preparing"] == 3.0
    assert plan["priors"] == pytest.approx(40 * 0.2)
    assert plan["training"] == pytest.approx(500 * 0.04)
    assert plan["generating"] == pytest.approx((pack_prompts + 1) * 2 * 0.2 + 2.0)

    # A second dog finds its class pictures in the bank: it paints none.
    dog = make_subject(db_session, owner, class_noun="Dog")
    assert estimates.plan_training(db_session, settings, dog)["priors"] == 0.0  # type: ignore[index]


def test_without_a_finished_studio_only_the_demo_model_has_an_estimate(db_session: Session, settings: Settings) -> None:
    subject = make_subject(db_session, make_user(db_session), quality="balanced")
    settings.base_model = "tiny"
    plan = estimates.plan_training(db_session, settings, subject)
    assert plan is not None and plan["measured_jobs"] == 0
    assert plan["priors"] == pytest.approx(estimates.DEMO_PRIOR_IMAGES * estimates.DEMO_SPEEDS.prior_image)

    settings.base_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert estimates.plan_training(db_session, settings, subject) is None


def planned_job(session: Session, subject: Subject, **values: Any) -> Job:
    plan = {"preparing": 10.0, "priors": 40.0, "training": 60.0, "generating": 20.0, "measured_jobs": 3}
    return make_job(session, subject, details={"plan": plan}, **values)


def test_the_bar_moves_with_the_planned_seconds_and_the_time_left_blends_in_the_measured_rate(
        db_session: Session) -> None:
    job = planned_job(db_session, make_subject(db_session, make_user(db_session)), status="running",
                      stage="priors", step=20, total=40)
    # Class priors hold 40 of the 130 planned seconds: half of them done is 10 + 20 of 130.
    assert service.overall_fraction(job) == pytest.approx(30 / 130)
    assert service.remaining_seconds(job) == pytest.approx(20 + 60 + 20)

    job.stage, job.step, job.total, job.eta_seconds = "training", 50, 100, 40.0
    assert service.overall_fraction(job) == pytest.approx(80 / 130)
    # Half-way through training the engine's 40 s and the plan's 30 s count half each, then generating's 20 s.
    assert service.remaining_seconds(job) == pytest.approx(0.5 * 40 + 0.5 * 30 + 20)
    status = service.describe_job(job, "dog", None)
    assert status.eta_seconds == pytest.approx(55.0)
    assert status.stage_label == "Training step 50/100 — under a minute left"

    job.status, job.stage = "done", "finished"
    assert service.remaining_seconds(job) is None


def test_a_queued_job_waits_for_what_the_jobs_ahead_have_left(db_session: Session) -> None:
    owner = make_user(db_session)
    start = utcnow()
    planned_job(db_session, make_subject(db_session, owner), status="running", stage="training", step=50,
                total=100, eta_seconds=30.0, enqueued_at=start - timedelta(minutes=3))
    planned_job(db_session, make_subject(db_session, owner), enqueued_at=start - timedelta(minutes=1))
    mine = planned_job(db_session, make_subject(db_session, owner), enqueued_at=start)

    status = service.job_status(db_session, mine, "dog")

    # The running job has 30 + 20 s left, the one queued ahead its 130 s: 180 s, then this job's own 130 s.
    assert status.queue_position == 2
    assert status.queue_wait_seconds == pytest.approx(180.0)
    assert status.eta_seconds == pytest.approx(180.0 + 130.0)
    assert status.stage_label == "Waiting in line — 1 job ahead (starts in about 3 min)"


def test_the_new_studio_page_gets_each_offered_models_estimate(db_session: Session, settings: Settings) -> None:
    from app.subjects.pages import time_estimates

    owner = make_user(db_session)
    finished_studio(db_session, owner)
    settings.base_model = "tiny"

    found = time_estimates(db_session, settings)

    model = found["models"][found["default_model"]]
    assert model["measured_jobs"] == 1 and model["warm_classes"] == ["dog"]
    assert model["per_image"] == pytest.approx(0.2)
    # Balanced pet: 3 s preparing, 40 class pictures x 0.2 s, 500 steps x 0.04 s, 2 s publishing.
    assert model["fixed"]["pet"]["balanced"] == pytest.approx(3 + 8 + 20 + 2)
    assert model["priors"]["pet"]["balanced"] == pytest.approx(8.0)
    assert found["pack_sizes"]["pet-adventures"] == len(estimates.STYLE_PACKS["pet-adventures"].prompts)


def test_a_generate_more_job_plans_loading_sampling_and_publishing(db_session: Session, settings: Settings) -> None:
    owner = make_user(db_session)
    finished_studio(db_session, owner)
    settings.base_model = "tiny"
    plan = estimates.plan_generation(db_session, settings, make_subject(db_session, owner), images=10)
    assert plan == {"generating": pytest.approx(3.0 + 10 * 0.2 + 2.0), "measured_jobs": 1}

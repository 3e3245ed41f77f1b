"""Job rules: cancel, queue position, and the status a person reads (labels, stepper, progress)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from app.jobs import repository, service
from app.models import utcnow
from app.storage import LocalStorage
from tests.app.factories import make_job, make_subject, make_user


def test_queue_position_counts_jobs_sent_earlier_of_every_account(db_session: Session) -> None:
    alice, bob = make_user(db_session), make_user(db_session)
    rex, tom = make_subject(db_session, alice), make_subject(db_session, bob, name="Tom", kind="cat", class_noun="cat")
    start = utcnow()
    first = make_job(db_session, rex, created_at=start)
    make_job(db_session, tom, created_at=start + timedelta(seconds=1), status="running", stage="training")
    second = make_job(db_session, tom, created_at=start + timedelta(seconds=2))
    third = make_job(db_session, rex, created_at=start + timedelta(seconds=3))
    done = make_job(db_session, rex, created_at=start - timedelta(seconds=5), status="done", stage="finished")

    assert service.queue_position(db_session, first) == 1
    assert service.queue_position(db_session, second) == 2
    assert service.queue_position(db_session, third) == 3
    assert service.queue_position(db_session, done) is None

    service.cancel_job(db_session, first)
    assert service.queue_position(db_session, third) == 2


def test_queue_position_follows_the_order_the_jobs_were_sent_not_created(db_session: Session) -> None:
    # Three requests at once: created in one order, their commits and sends finish in another, and
    # workers take the messages in the order they were sent.
    subject = make_subject(db_session, make_user(db_session))
    start = utcnow()
    created_first = make_job(db_session, subject, created_at=start, enqueued_at=start + timedelta(seconds=2))
    created_second = make_job(db_session, subject, created_at=start + timedelta(milliseconds=5),
                              enqueued_at=start + timedelta(seconds=1))
    created_third = make_job(db_session, subject, created_at=start + timedelta(milliseconds=9),
                             enqueued_at=start + timedelta(seconds=3))
    positions = [service.queue_position(db_session, job) for job in (created_first, created_second, created_third)]
    assert positions == [2, 1, 3]


def test_a_job_whose_message_was_lost_is_ahead_of_nobody(db_session: Session) -> None:
    subject = make_subject(db_session, make_user(db_session))
    start = utcnow()
    # The oldest job's send failed (or Redis lost its message): no worker will take it before the
    # reaper sends it again, at the back of the line.
    lost = make_job(db_session, subject, created_at=start - timedelta(minutes=5), enqueued_at=None)
    waiting = make_job(db_session, subject, created_at=start, enqueued_at=start)
    later = make_job(db_session, subject, created_at=start + timedelta(seconds=1),
                     enqueued_at=start + timedelta(seconds=1))
    assert service.queue_position(db_session, waiting) == 1
    assert service.queue_position(db_session, later) == 2
    assert service.queue_position(db_session, lost) == 3


def test_queue_position_breaks_ties_on_equal_send_times(db_session: Session) -> None:
    subject = make_subject(db_session, make_user(db_session))
    moment = utcnow()
    jobs = [make_job(db_session, subject, created_at=moment, enqueued_at=moment) for _ in range(3)]
    assert sorted(service.queue_position(db_session, job) or 0 for job in jobs) == [1, 2, 3]


def test_cancel_queued_job_ends_it_at_once(db_session: Session) -> None:
    job = make_job(db_session, make_subject(db_session, make_user(db_session)))
    service.cancel_job(db_session, job)
    assert job.status == "cancelled"
    assert job.finished_at is not None


def test_cancel_running_job_asks_the_worker_to_stop(db_session: Session) -> None:
    job = make_job(db_session, make_subject(db_session, make_user(db_session)), status="running", stage="training")
    service.cancel_job(db_session, job)
    assert job.status == "running"
    assert job.cancel_requested is True
    assert job.finished_at is None
    assert service.stage_label(job, "dog", None) == "Cancelling…"


@pytest.mark.parametrize("status", ["done", "failed", "cancelled"])
def test_cancel_ended_job_is_refused(db_session: Session, status: str) -> None:
    job = make_job(db_session, make_subject(db_session, make_user(db_session)), status=status, stage="finished")
    with pytest.raises(service.JobNotCancellable, match=status):
        service.cancel_job(db_session, job)


def test_job_status_for_a_queued_job(db_session: Session) -> None:
    subject = make_subject(db_session, make_user(db_session))
    make_job(db_session, subject, created_at=utcnow() - timedelta(minutes=2))
    make_job(db_session, subject, created_at=utcnow() - timedelta(minutes=1))
    job = make_job(db_session, subject)
    status = service.job_status(db_session, job, "dog")
    assert status.queue_position == 3
    assert status.stage_label == "Waiting in line — 2 jobs ahead"
    assert status.fraction == 0.0
    assert status.finished is False
    assert [step.key for step in status.stages] == ["queued", "preparing", "priors", "training", "generating", "done"]
    assert status.stages[0].state == "active"
    assert status.stages[0].detail == "3rd in line"
    assert {step.state for step in status.stages[1:]} == {"pending"}


def test_labels_of_each_stage(db_session: Session) -> None:
    subject = make_subject(db_session, make_user(db_session))
    job = make_job(db_session, subject, status="running", stage="preparing")
    assert service.stage_label(job, "dog", None) == "Preparing your photos"

    job.stage, job.step, job.total = "priors", 12, 50
    assert service.stage_label(job, "dog", None) == "Painting reference pictures of dogs (12/50)"
    job.details = {"prior_reused": 50}
    job.step = 50
    assert service.stage_label(job, "dog", None) == "Reused 50 reference pictures of dogs from the shared bank"
    job.details = {"prior_reused": 20}
    job.step = 25
    assert service.stage_label(job, "woman", None) == (
        "Painting reference pictures of women (25/50) — reused 20 from the shared bank"
    )

    job.stage, job.step, job.total, job.eta_seconds = "training", 120, 400, 130.0
    assert service.stage_label(job, "dog", None) == "Training step 120/400 — about 2 min left"
    job.eta_seconds = None
    assert service.stage_label(job, "dog", None) == "Training step 120/400"

    job.stage, job.details = "sampling", {"images_done": 7, "images_total": 40}
    assert service.stage_label(job, "dog", None) == "Generating pictures 7/40"

    job.status, job.stage = "done", "finished"
    assert service.stage_label(job, "dog", None) == "Done"
    job.status, job.failure_reason = "failed", "The photos could not be read."
    assert service.stage_label(job, "dog", None) == "Failed: The photos could not be read."
    job.status = "cancelled"
    assert service.stage_label(job, "dog", None) == "Cancelled"


def test_retried_job_says_it_waits_to_retry(db_session: Session) -> None:
    subject = make_subject(db_session, make_user(db_session))
    retried = make_job(db_session, subject, attempts=1, max_attempts=3)
    assert service.stage_label(retried, "dog", 1) == "Waiting to retry (attempt 2 of 3) — next in line"
    assert service.stage_label(make_job(db_session, subject), "dog", 1) == "Next in line"


def test_overall_fraction_grows_through_the_stages(db_session: Session) -> None:
    job = make_job(db_session, make_subject(db_session, make_user(db_session)), status="running")
    points = []
    for stage, step, total, details in [
        ("preparing", 0, 0, {}),
        ("priors", 10, 50, {}),
        ("priors", 50, 50, {}),
        ("training", 100, 400, {}),
        ("training", 400, 400, {}),
        ("sampling", 3, 40, {"images_done": 3, "images_total": 40}),
        ("scoring", 1, 2, {"images_done": 40, "images_total": 40}),
        ("publishing", 0, 1, {"images_done": 40, "images_total": 40}),
    ]:
        job.stage, job.step, job.total, job.details = stage, step, total, details
        points.append(service.overall_fraction(job))
    assert points == sorted(points)
    assert 0.0 <= points[0] < points[-1] < 1.0
    assert points[3] == pytest.approx(0.05 + 0.15 + 0.6 * 0.25)
    job.status, job.stage = "done", "finished"
    assert service.overall_fraction(job) == 1.0


def test_generate_job_has_a_short_stepper(db_session: Session) -> None:
    subject = make_subject(db_session, make_user(db_session))
    job = make_job(db_session, subject, kind="generate", status="running", stage="sampling", step=2, total=8)
    status = service.describe_job(job, "dog", None)
    assert [step.key for step in status.stages] == ["queued", "generating", "done"]
    assert status.stages[1].state == "active"
    assert status.stages[1].detail == "2/8"
    assert status.fraction == pytest.approx(0.9 * 2 / 8)


def test_failed_job_marks_the_stage_it_stopped_in(db_session: Session) -> None:
    job = make_job(
        db_session, make_subject(db_session, make_user(db_session)), status="failed", stage="training", step=5,
        total=10, failure_reason="The loss became NaN.", details={"prior_reused": 10},
    )
    status = service.describe_job(job, "dog", None)
    states = {step.key: step.state for step in status.stages}
    assert states == {"queued": "done", "preparing": "done", "priors": "done", "training": "failed",
                      "generating": "pending", "done": "pending"}
    assert status.stages[2].detail == "reused 10"
    assert status.finished is True
    assert status.eta_seconds is None
    assert status.stage_label == "Failed: The loss became NaN."


def test_status_carries_previews_losses_and_the_demo_flag(db_session: Session, storage: LocalStorage) -> None:
    job = make_job(
        db_session, make_subject(db_session, make_user(db_session)), status="running", stage="training",
        loss=float("nan"), preview_keys=["a/p-10.png", "a/p-20.png"],
    )
    # Set after the flush: PostgreSQL's JSON refuses Infinity, but describe_job must survive odd values.
    job.details = {"demo_model": True, "loss_history": [[1, 0.5], [2, float("inf")], 0.25, "junk"]}
    status = service.describe_job(job, "dog", None)
    assert status.loss is None
    assert status.loss_history == [0.5, 0.25]
    assert status.demo_model is True
    assert len(status.preview_urls) == 2
    assert status.preview_urls[0].startswith(f"/api/v1/jobs/{job.id}/previews/0?v=")
    assert status.preview_urls[0] != status.preview_urls[1].replace("/1?", "/0?")


def test_a_run_that_went_on_lighter_says_so(db_session: Session) -> None:
    job = make_job(db_session, make_subject(db_session, make_user(db_session)), status="running", stage="training")
    assert service.describe_job(job, "dog", None).notes == []
    job.details = {"memory_fallback": ["gradient checkpointing", "one image per sampling call"]}
    assert service.describe_job(job, "dog", None).notes == [service.MEMORY_FALLBACK_NOTE]


def test_repository_scopes_jobs_to_their_owner(db_session: Session) -> None:
    alice, bob = make_user(db_session), make_user(db_session)
    subject = make_subject(db_session, alice)
    job = make_job(db_session, subject)
    assert repository.get_job(db_session, job.id, alice.id) is job
    assert repository.get_job(db_session, job.id, bob.id) is None
    assert repository.get_job_and_class_noun(db_session, job.id, bob.id) is None
    assert repository.get_job_and_class_noun(db_session, job.id, alice.id) == (job, "dog")
    assert repository.jobs_of_subject(db_session, subject.id, bob.id) == []
    assert repository.latest_job(db_session, subject.id, bob.id) is None


def test_latest_job_and_active_jobs(db_session: Session) -> None:
    alice = make_user(db_session)
    subject = make_subject(db_session, alice)
    old = make_job(db_session, subject, status="done", stage="finished", created_at=utcnow() - timedelta(hours=1))
    assert repository.active_job_of_subject(db_session, subject.id) is None
    new = make_job(db_session, subject, kind="generate")
    assert repository.latest_job(db_session, subject.id, alice.id) is new
    assert repository.jobs_of_subject(db_session, subject.id, alice.id) == [new, old]
    assert repository.active_job_of_subject(db_session, subject.id) is new
    assert repository.count_active_jobs_of_owner(db_session, alice.id) == 1


@pytest.mark.parametrize(
    ("noun", "expected"),
    [("dog", "dogs"), ("person", "people"), ("woman", "women"), ("fox", "foxes"), ("guinea pig", "guinea pigs"),
     ("pony", "ponies"), ("donkey", "donkeys")],
)
def test_plural(noun: str, expected: str) -> None:
    assert service.plural(noun) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(None, ""), (30, "under a minute left"), (130, "about 2 min left"), (3600, "about 1 h left"),
     (3900, "about 1 h 5 min left"), (float("nan"), "")],
)
def test_format_eta(seconds: float | None, expected: str) -> None:
    assert service.format_eta(seconds) == expected


def test_generate_job_loading_its_model_is_the_start_of_generating(db_session: Session) -> None:
    subject = make_subject(db_session, make_user(db_session), weights_key="w")
    job = make_job(db_session, subject, kind="generate", status="running", stage="preparing", step=0, total=4,
                   details={"images_done": 0, "images_total": 4})
    status = service.describe_job(job, "dog", None)
    assert status.stage_label == "Loading your trained model"
    assert [(step.key, step.state) for step in status.stages] == [
        ("queued", "done"), ("generating", "active"), ("done", "pending")
    ]
    assert status.stages[1].detail == "0/4"
    assert status.fraction == 0.0

"""The operator console through the in-process app: the queue, workers, accounts and quotas, storage."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.accounts.usage import next_month_start
from app.models import Job, PriorBank, Subject, User, WorkerHeartbeat, utcnow
from app.operator import service
from app.storage import Storage
from app.storage.base import job_prefix
from tests.app.conftest import page_context, page_template
from tests.app.factories import make_job, make_photo, make_subject, png_bytes


@pytest.fixture
def operator(make_user: Callable[..., User], db: Session) -> User:
    user = make_user("op@example.com")
    row = db.get(User, user.id)
    assert row is not None
    row.is_operator = True
    db.commit()
    return row


def heartbeat(db: Session, name: str, *, queues: list[str] | None = None, seconds_ago: float = 0,
              job: Job | None = None, speed: float | None = None) -> WorkerHeartbeat:
    row = WorkerHeartbeat(name=name, host=name.split(":")[0], pid=int(name.split(":")[1]),
                          queues=queues if queues is not None else ["cpu", "gpu"],
                          last_seen_at=utcnow() - timedelta(seconds=seconds_ago), gpu_name="NVIDIA H200",
                          gpu_memory_used_bytes=2**30, gpu_memory_total_bytes=141 * 2**30, gpu_utilisation=87.0,
                          current_job_id=job.id if job else None, steps_per_second=speed)
    db.add(row)
    db.flush()
    return row


def test_estimated_starts_follow_free_workers() -> None:
    # Two workers: one idle, one busy for 100 s more; each job takes 600 s.
    assert service.estimate_starts(3, [100.0], 1, 600.0) == [0.0, 100.0, 600.0]
    assert service.estimate_starts(2, [], 0, 600.0) == [None, None]


def test_failures_group_by_their_first_sentence() -> None:
    assert service.failure_key("The GPU ran out of memory. Step 40 of 400.") == "The GPU ran out of memory."
    assert service.failure_key(None) == "No reason recorded."


def test_queue_page_shows_waiting_running_and_failed_jobs_with_their_worker(
    client: TestClient, login: Callable[..., TestClient], operator: User, make_user: Callable[..., User],
    db: Session,
) -> None:
    owner = db.get(User, make_user("ann@example.com").id)
    assert owner is not None
    running = make_job(db, make_subject(db, owner, name="Rex"), status="running", stage="training", step=5,
                       total=50, eta_seconds=120.0, lease_holder="gpu-box:4242")
    first = make_job(db, make_subject(db, owner, name="Tom"))
    second = make_job(db, make_subject(db, owner, name="Kit"))
    second.enqueued_at = (first.enqueued_at or utcnow()) + timedelta(seconds=1)
    make_job(db, make_subject(db, owner, name="Max"), status="failed", finished_at=utcnow(),
             failure_reason="The GPU ran out of memory. Try the fast preset.")
    heartbeat(db, "gpu-box:100", job=running, speed=3.5)
    heartbeat(db, "gpu-box:200")
    heartbeat(db, "old-box:300", seconds_ago=3600)  # lost: does not count
    db.commit()

    login(client, operator)
    page = client.get("/operator")
    assert page.status_code == 200 and page_template(page) == "operator/queue.html"
    view = page_context(page)["view"]
    assert view.live_gpu_workers == 2
    assert [(r.job.id, r.worker) for r in view.running] == [(running.id, "gpu-box:100")]
    # One idle worker takes the first at once; the second waits for the running job's 120 s.
    assert [(q.job.id, q.position, q.estimated_start_seconds) for q in view.queued] == [
        (first.id, 1, 0.0), (second.id, 2, 120.0)]
    assert [(g.reason, len(g.jobs)) for g in view.failures] == [("The GPU ran out of memory.", 1)]
    assert "gpu-box:100" in page.text and "Kit" in page.text

    workers = client.get("/operator/workers")
    lost = {row.worker.name: row.lost for row in page_context(workers)["workers"]}
    assert lost == {"gpu-box:100": False, "gpu-box:200": False, "old-box:300": True}
    assert "NVIDIA H200" in workers.text and "3.50 steps/s" in workers.text


def test_cancel_and_retry_reuse_the_owners_rules(
    client: TestClient, login: Callable[..., TestClient], operator: User, make_user: Callable[..., User],
    db: Session, app_storage: Storage, csrf_token: Callable[[TestClient], str],
) -> None:
    owner = db.get(User, make_user("ann@example.com").id)
    assert owner is not None
    queued = make_job(db, make_subject(db, owner, name="Tom"))
    failed_subject = make_subject(db, owner, name="Max")
    make_photo(db, app_storage, failed_subject)
    make_job(db, failed_subject, status="failed", finished_at=utcnow(), failure_reason="Out of memory.")
    db.commit()
    login(client, operator)
    token = csrf_token(client)
    sent: list[str] = []
    from app import queue

    queue.set_sender(lambda name, kwargs, queue_name: sent.append(name))
    try:
        assert client.post(f"/operator/jobs/{queued.id}/cancel", data={"csrf_token": token},
                           follow_redirects=False).status_code == 303
        assert client.post(f"/operator/studios/{failed_subject.id}/retry", data={"csrf_token": token},
                           follow_redirects=False).status_code == 303
    finally:
        queue.set_sender(None)
    db.expire_all()
    assert db.get(Job, queued.id).status == "cancelled"  # type: ignore[union-attr]
    jobs = db.scalars(select(Job).where(Job.subject_id == failed_subject.id, Job.status == "queued")).all()
    assert len(jobs) == 1 and sent == ["training.run"]
    # Cancelling a job that ended is refused with the owner's sentence, through the API too.
    answer = client.post(f"/api/v1/operator/jobs/{queued.id}/cancel", headers={"X-CSRF-Token": token})
    assert answer.status_code == 409 and "already ended" in answer.json()["detail"]


def test_disable_refuses_the_next_request_and_quotas_refuse_the_next_studio(
    client: TestClient, login: Callable[..., TestClient], operator: User, make_user: Callable[..., User],
    db: Session, app_storage: Storage, api_headers: Callable[[User], dict[str, str]],
    csrf_token: Callable[[TestClient], str],
) -> None:
    ann = make_user("ann@example.com")
    ann_headers = api_headers(ann)
    make_subject(db, db.get(User, ann.id))  # type: ignore[arg-type]
    db.commit()
    op_headers = api_headers(operator)

    # Quotas through the API: one studio a month, and Ann has made one this month.
    answer = client.patch(f"/api/v1/operator/accounts/{ann.id}", json={"studios_per_month": 1},
                          headers=op_headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["studios_per_month"] == 1 and answer.json()["studios"] == 1
    refused = client.post("/api/v1/subjects", headers=ann_headers, files=[("photos", ("a.jpg", b"x", "image/jpeg"))],
                          data={"name": "Rex", "kind": "dog", "consent": "true"})
    assert refused.status_code == 429
    assert "may create 1 studio a month" in refused.json()["detail"]

    # GPU minutes: 30 minutes used this month against a quota of 20.
    client.patch(f"/api/v1/operator/accounts/{ann.id}", json={"studios_per_month": None,
                                                              "gpu_minutes_per_month": 20}, headers=op_headers)
    subject = db.scalars(select(Subject).where(Subject.owner_id == ann.id)).one()
    now = utcnow()
    make_job(db, subject, status="done", started_at=now - timedelta(minutes=31), finished_at=now - timedelta(minutes=1))
    db.commit()
    refused = client.post("/api/v1/subjects", headers=ann_headers, files=[("photos", ("a.jpg", b"x", "image/jpeg"))],
                          data={"name": "Rex", "kind": "dog", "consent": "true"})
    assert refused.status_code == 429 and "used this month's 20 GPU minutes" in refused.json()["detail"]
    # "Generate more" spends GPU minutes too: refused until the month ends.
    subject.weights_key = "users/weights/lora.safetensors"
    db.commit()
    refused = client.post(f"/api/v1/subjects/{subject.id}/generate", headers=ann_headers,
                          json={"prompts": ["in the snow"]})
    assert refused.status_code == 429 and "used this month's 20 GPU minutes" in refused.json()["detail"]
    until_next_month = (next_month_start() - utcnow()).total_seconds()
    assert abs(int(refused.headers["Retry-After"]) - until_next_month) < 30
    # "Try again" trains again: refused too, for the operator as for the owner, with the owner's sentence.
    failed = make_subject(db, db.get(User, ann.id))  # type: ignore[arg-type]
    make_photo(db, app_storage, failed)
    make_job(db, failed, status="failed", finished_at=utcnow(), failure_reason="Out of memory.")
    db.commit()
    retried = client.post(f"/api/v1/operator/subjects/{failed.id}/retry", headers=op_headers)
    assert retried.status_code == 409 and "20 GPU minutes" in retried.json()["detail"]

    # A bad quota on the page is named; nothing changes.
    login(client, operator)
    token = csrf_token(client)
    bad = client.post(f"/operator/accounts/{ann.id}/quotas", data={"csrf_token": token, "studios_per_month": "lots"})
    assert "Studios per month must be a whole number" in bad.text

    # Disabled: the next request with Ann's token is refused; enabled again, it works.
    assert client.post(f"/operator/accounts/{ann.id}/disable", data={"csrf_token": token},
                       follow_redirects=False).status_code == 303
    assert client.get("/api/v1/subjects", headers=ann_headers).status_code == 401
    assert client.post(f"/operator/accounts/{ann.id}/enable", data={"csrf_token": token},
                       follow_redirects=False).status_code == 303
    assert client.get("/api/v1/subjects", headers=ann_headers).status_code == 200
    # An operator cannot lock itself out.
    own = client.patch(f"/api/v1/operator/accounts/{operator.id}", json={"is_active": False}, headers=op_headers)
    assert own.status_code == 409

    accounts = client.get("/api/v1/operator/accounts", headers=op_headers).json()
    ann_row = next(row for row in accounts if row["email"] == "ann@example.com")
    assert ann_row["gpu_minutes_per_month"] == 20 and 29.5 < ann_row["gpu_minutes_this_month"] < 30.5


def test_storage_page_counts_bytes_by_kind_and_clears_a_prior_bank(
    client: TestClient, login: Callable[..., TestClient], operator: User, db: Session, app_storage: Storage,
    csrf_token: Callable[[TestClient], str],
) -> None:
    subject = make_subject(db, operator)
    photo = make_photo(db, app_storage, subject)
    bank = PriorBank(key="abc", model_fingerprint="f" * 64, class_prompt="a photo of a dog", resolution=64,
                     sampler="ddim", steps=4, guidance=7.5, image_count=1, storage_prefix="priors/abc/")
    db.add(bank)
    db.commit()
    app_storage.put_bytes("priors/abc/00000.png", png_bytes(1), "image/png")
    login(client, operator)
    page = client.get("/operator/storage")
    view = page_context(page)["view"]
    assert view.bytes_by_kind["photos"] == photo.byte_size
    assert view.bytes_by_kind["prior bank"] == len(png_bytes(1))
    assert [b.bank.class_prompt for b in view.banks] == ["a photo of a dog"]
    cleared = client.post(f"/operator/priors/{bank.id}/clear", data={"csrf_token": csrf_token(client)})
    assert cleared.status_code == 200 and "was cleared" in cleared.text
    assert app_storage.list("priors/") == []
    assert client.get("/operator/models").status_code == 200

    # Fill: a GPU worker gets the task with the model's key, the class and the count; bad values are named.
    from app import queue

    sent: list[tuple[str, dict[str, str], str]] = []
    queue.set_sender(lambda name, kwargs, queue_name: sent.append((name, kwargs, queue_name)))
    try:
        token = csrf_token(client)
        filled = client.post("/operator/priors/fill", data={"csrf_token": token, "model": "default",
                                                            "class_noun": " Dog", "count": "50"})
        assert "A GPU worker will paint 50 prior images of “dog”" in filled.text
        refused = client.post("/operator/priors/fill", data={"csrf_token": token, "model": "sdxl",
                                                             "class_noun": "dog", "count": "50"})
        assert "sdxl" in page_context(refused)["flash"].message
        refused = client.post("/operator/priors/fill", data={"csrf_token": token, "model": "default",
                                                             "class_noun": "dog", "count": "5000"})
        assert "between 1 and 1000" in refused.text
    finally:
        queue.set_sender(None)
    assert sent == [("priors.fill", {"model": "default", "class_noun": "dog", "count": "50"}, "gpu")]


def test_disabling_an_account_stops_its_jobs_and_deletes_a_waiting_retrys_checkpoint(
    client: TestClient, login: Callable[..., TestClient], operator: User, make_user: Callable[..., User],
    db: Session, app_storage: Storage, csrf_token: Callable[[TestClient], str],
) -> None:
    ann, bob = make_user("ann@example.com"), make_user("bob@example.com")
    ann_row = db.get(User, ann.id)
    assert ann_row is not None
    waiting = make_job(db, make_subject(db, ann_row), attempts=1, details={"checkpoint": "x"})
    checkpoint = job_prefix(ann.id, waiting.subject_id, waiting.id) + "checkpoints/step-4/state.bin"
    app_storage.put_bytes(checkpoint, b"optimizer state")
    running = make_job(db, make_subject(db, ann_row), status="running", stage="training")
    finished = make_job(db, make_subject(db, ann_row), status="done")
    bobs = make_job(db, make_subject(db, db.get(User, bob.id)))  # type: ignore[arg-type]
    db.commit()

    login(client, operator)
    answer = client.post(f"/operator/accounts/{ann.id}/disable", data={"csrf_token": csrf_token(client)})
    assert "ann@example.com is disabled: its next request is refused, and its 2 jobs in progress are stopped." \
        in answer.text
    db.expire_all()
    states = {job.id: (job.status, job.cancel_requested) for job in db.scalars(select(Job))}
    assert states[waiting.id] == ("cancelled", True)
    assert states[running.id] == ("running", True)  # the worker ends it at its next check
    assert states[finished.id] == ("done", False) and states[bobs.id] == ("queued", False)
    assert not app_storage.exists(checkpoint)
    # Disabling again stops nothing more; enabling starts nothing.
    client.post(f"/operator/accounts/{ann.id}/disable", data={"csrf_token": csrf_token(client)})
    client.post(f"/operator/accounts/{ann.id}/enable", data={"csrf_token": csrf_token(client)})
    db.expire_all()
    assert db.get(Job, waiting.id).status == "cancelled"  # type: ignore[union-attr]

"""The operator console in a real browser (Debian's chromium through Playwright), under the strict CSP.

An operator sees a running job with its worker (and the page updates itself), cancels a queued job,
retries a failed one, sets a quota that the account's next new studio hits, and disables the account,
whose next request is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import queue
from app.models import Job, User, WorkerHeartbeat, utcnow
from app.operator import pages
from app.storage import Storage
from tests.app.conftest import PASSWORD
from tests.app.factories import make_job, make_photo, make_subject

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


@pytest.fixture
def sent() -> Iterator[list[str]]:
    names: list[str] = []
    queue.set_sender(lambda name, kwargs, queue_name: names.append(name))
    yield names
    queue.set_sender(None)


def sign_in(page: object, live_url: str, email: str) -> None:
    page.goto(f"{live_url}/login")  # type: ignore[attr-defined]
    page.fill("#email", email)  # type: ignore[attr-defined]
    page.fill("#password", PASSWORD)  # type: ignore[attr-defined]
    page.click("button[type=submit]")  # type: ignore[attr-defined]
    page.wait_for_url(f"{live_url}/studios")  # type: ignore[attr-defined]


def test_an_operator_runs_the_studio_from_the_console(
    live_url: str, make_user: Callable[..., User], db: Session, app_storage: Storage, sent: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    monkeypatch.setattr(pages, "REFRESH_SECONDS", 0.5)
    operator = db.get(User, make_user("op@example.com").id)
    ann = db.get(User, make_user("ann@example.com").id)
    assert operator is not None and ann is not None
    operator.is_operator = True
    running = make_job(db, make_subject(db, ann, name="Rex"), status="running", stage="training", step=5,
                       total=50, lease_holder="gpu-box:4243", started_at=utcnow())
    queued = make_job(db, make_subject(db, ann, name="Tom"))
    failed_studio = make_subject(db, ann, name="Max")
    make_photo(db, app_storage, failed_studio)
    make_job(db, failed_studio, status="failed", finished_at=utcnow(), failure_reason="The GPU ran out of memory.")
    db.add(WorkerHeartbeat(name="gpu-box:4242", host="gpu-box", pid=4242, queues=["gpu"], gpu_name="NVIDIA H200",
                           current_job_id=running.id, steps_per_second=3.25, last_seen_at=utcnow()))
    db.commit()

    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            problems: list[str] = []
            console, customer = browser.new_page(), browser.new_context().new_page()
            for each in (console, customer):
                each.on("pageerror", lambda error: problems.append(str(error)))
                each.on("console", lambda message: problems.append(message.text)
                        if "Content Security Policy" in message.text else None)
            sign_in(console, live_url, "op@example.com")
            sign_in(customer, live_url, "ann@example.com")

            console.get_by_role("link", name="Console").click()
            row = console.locator(f"tr[data-job='{running.id}']")
            assert "gpu-box:4242" in row.locator("[data-worker]").inner_text()
            assert "5/50" in row.inner_text()
            # The page follows the job by itself.
            db.get(Job, running.id).step = 42  # type: ignore[union-attr]
            db.commit()
            playwright_api.expect(row).to_contain_text("42/50", timeout=15_000)

            console.locator(f"tr[data-job='{queued.id}'] button", has_text="Cancel").click()
            assert "The job was cancelled." in console.locator(".flash").inner_text()
            console.get_by_role("button", name="Retry").click()
            assert "Trying again" in console.locator(".flash").inner_text()
            assert sent == ["training.run"]

            console.get_by_role("link", name="Workers").click()
            worker = console.locator("tr[data-worker='gpu-box:4242']")
            assert "NVIDIA H200" in worker.inner_text() and "3.25 steps/s" in worker.inner_text()

            # A quota of 3 studios a month: Ann has made 3, so her next new studio is refused, in a sentence.
            console.get_by_role("link", name="Accounts").click()
            ann_row = console.locator("tr[data-account='ann@example.com']")
            ann_row.locator("input[name=studios_per_month]").fill("3")
            ann_row.get_by_role("button", name="Save quotas").click()
            assert "The quotas of ann@example.com are saved." in console.locator(".flash").inner_text()
            customer.goto(f"{live_url}/studios/new")
            assert "may create 3 studios a month" in customer.locator("main").inner_text()

            console.locator("tr[data-account='ann@example.com']").get_by_role("button", name="Disable").click()
            # Her running job and the one the retry queued are stopped with her account.
            assert "ann@example.com is disabled: its next request is refused, and its 2 jobs in progress " \
                "are stopped." in console.locator(".flash").inner_text()
            customer.goto(f"{live_url}/studios")
            assert customer.url.startswith(f"{live_url}/login?next=")
            assert problems == []
        finally:
            browser.close()
    db.expire_all()
    assert db.get(Job, queued.id).status == "cancelled"  # type: ignore[union-attr]
    retried = db.scalars(select(Job).where(Job.subject_id == failed_studio.id, Job.status != "failed")).all()
    assert [(job.status, job.cancel_requested) for job in retried] == [("cancelled", True)]
    assert db.get(Job, running.id).cancel_requested  # type: ignore[union-attr]

"""The studio page in a real browser (Debian's chromium through Playwright) against a live server: it
follows its job by polling, without reloading, until the job is done; and the gallery's lightbox and
favourites work with the keyboard."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.models import GeneratedImage, Job, User
from app.storage import Storage
from app.storage.base import preview_key
from tests.app.conftest import PASSWORD
from tests.app.factories import make_image, make_job, make_subject, png_bytes

expect = pytest.importorskip("playwright.sync_api").expect

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


@pytest.fixture
def browser_page() -> Iterator[tuple[Any, list[str]]]:
    """A chromium page and the list of JavaScript errors it raised."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            yield page, errors
        finally:
            browser.close()


def sign_in(page: Any, live_url: str, user: User, next_path: str) -> None:
    page.goto(f"{live_url}/login?next={next_path}")
    page.fill("#email", user.email)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"**{next_path}")


def update_job(engine: Engine, job_id: Any, **values: Any) -> None:
    with sessionmaker(bind=engine)() as session:
        job = session.get(Job, job_id)
        assert job is not None
        for name, value in values.items():
            setattr(job, name, value)
        session.commit()


def test_studio_page_follows_the_job_until_done(
    live_url: str, app: FastAPI, clean_db: Engine, make_user: Callable[..., User],
    browser_page: tuple[Any, list[str]],
) -> None:
    page, errors = browser_page
    user = make_user("watcher@example.com")
    storage: Storage = app.state.storage
    with Session(clean_db, expire_on_commit=False) as session:
        subject = make_subject(session, user)
        job = make_job(session, subject, status="running", stage="priors", step=3, total=8,
                       details={"demo_model": True})
        session.commit()
    sign_in(page, live_url, user, f"/studios/{subject.id}")
    label = page.locator("[data-stage-label]")
    assert label.inner_text() == "Painting reference pictures of dogs (3/8)"
    expect(page.get_by_text("built-in demo model")).to_be_visible()
    expect(page.locator("[data-gallery-link]")).to_be_hidden()

    key = preview_key(user.id, subject.id, job.id, "step-20.png")
    storage.put_bytes(key, png_bytes(3, size=64), "image/png")
    update_job(clean_db, job.id, stage="training", step=20, total=40, loss=0.25, eta_seconds=95.0,
               preview_keys=[key], details={"demo_model": True, "loss_history": [0.5, 0.4, 0.3, 0.25]})
    expect(label).to_have_text(re.compile(r"^Training step 20/40 — about 2 min left"), timeout=10000)
    expect(page.locator("[data-eta]")).to_have_text("about 2 min left")
    expect(page.locator('[data-step="priors"]')).to_have_class(re.compile(r"\bis-done\b"))
    expect(page.locator('[data-step="training"]')).to_have_class(re.compile(r"\bis-current\b"))
    expect(page.locator("[data-preview-grid] img")).to_have_js_property("naturalWidth", 64)  # the preview loaded
    expect(page.locator("[data-sparkline-line]")).to_have_attribute("points", re.compile(r"\d"))  # the loss history
    expect(page.locator("[data-cancel-form]")).to_be_visible()
    expect(page.locator("[data-notes]")).to_be_hidden()

    update_job(clean_db, job.id, step=21, details={"demo_model": True, "loss_history": [0.5, 0.4, 0.3, 0.25],
                                                   "memory_fallback": ["gradient checkpointing"]})
    expect(page.locator("[data-notes]")).to_contain_text("The GPU ran out of memory", timeout=10000)

    with Session(clean_db) as session:
        make_image(session, storage, session.merge(subject), session.merge(job))
        session.commit()
    update_job(clean_db, job.id, status="done", stage="finished", step=1, total=1)
    expect(page.locator("[data-job-progress]")).to_have_attribute("data-status", "done", timeout=10000)
    expect(label).to_have_text("Done")
    expect(page.locator("[data-job-title]")).to_have_text("Your studio is trained")  # no longer "Training your studio"
    expect(page.locator("[data-eta]")).to_be_hidden()
    expect(page.locator("[data-gallery-link]")).to_be_visible()
    expect(page.locator("[data-cancel-form]")).to_be_hidden()
    expect(page.locator("[data-overall]")).to_have_js_property("value", 1)
    assert errors == []


def test_gallery_lightbox_and_favourite(
    live_url: str, app: FastAPI, clean_db: Engine, make_user: Callable[..., User],
    browser_page: tuple[Any, list[str]],
) -> None:
    page, errors = browser_page
    user = make_user("viewer@example.com")
    storage: Storage = app.state.storage
    with Session(clean_db, expire_on_commit=False) as session:
        subject = make_subject(session, user, weights_key="w")
        job = make_job(session, subject, status="done", stage="finished")
        images = [make_image(session, storage, subject, job, seed=seed, data=png_bytes(seed, size=64))
                  for seed in range(3)]
        session.commit()
    sign_in(page, live_url, user, f"/studios/{subject.id}/gallery")

    page.click(f'[data-image-id="{images[0].id}"] [data-lightbox-item]')
    counter = page.locator("[data-lightbox-counter]")
    expect(page.locator("[data-lightbox]")).to_be_visible()
    expect(counter).to_have_text("1 / 3")
    page.keyboard.press("ArrowRight")
    expect(counter).to_have_text("2 / 3")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    expect(counter).to_have_text("3 / 3")  # wraps around
    page.click("[data-lightbox-favourite]")
    expect(page.locator("[data-lightbox-favourite]")).to_have_attribute("aria-pressed", "true")
    page.keyboard.press("Escape")
    expect(page.locator("[data-lightbox]")).to_be_hidden()

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with Session(clean_db) as session:
            if session.get(GeneratedImage, images[2].id).favourite:  # type: ignore[union-attr]
                break
        time.sleep(0.1)
    else:
        pytest.fail("the favourite did not reach the database")
    heart = page.locator(f'[data-image-id="{images[2].id}"] [data-favourite-button]')
    expect(heart).to_have_attribute("aria-pressed", "true")
    assert errors == []

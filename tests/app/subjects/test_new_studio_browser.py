"""The new-studio page in a real browser (Debian's chromium through Playwright) against a live server:
kind tiles, photo previews and removal, a refused photo marked with its reason, then the studio created."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, select
from sqlalchemy.orm import sessionmaker

from app.models import Subject, User
from tests.app import photo_factory
from tests.app.conftest import PASSWORD
from tests.app.subjects.conftest import SentTask

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def live_url(app: FastAPI) -> Iterator[str]:
    """The app served by uvicorn on a free loopback port, in a thread, for the length of the test."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the live server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def photo_files(tmp_path: Path) -> dict[str, Path]:
    files = {name: data for name, data in photo_factory.make_photos(3, start_seed=400)}
    files["notes.jpg"] = photo_factory.make_fake_pdf()  # named like a photo; only the server can tell
    paths = {}
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        paths[name] = path
    return paths


def test_create_a_studio_in_the_browser(
    live_url: str,
    make_user: Callable[..., User],
    photo_files: dict[str, Path],
    sent_tasks: list[SentTask],
    clean_db: Engine,
) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    user = make_user("browser@example.com")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{live_url}/login?next=/studios/new")
            page.fill("#email", user.email)
            page.fill("#password", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url("**/studios/new")

            # The kind tiles reveal only their own extra field and filter the style packs.
            assert page.is_hidden("[data-kind-only=animal]") and page.is_hidden("[data-kind-only=person]")
            page.click("label.choice:has(input[value=animal])")
            assert page.is_visible("#class_noun_animal") and page.is_hidden("[data-kind-only=person]")
            assert page.is_disabled("option[value=portrait-classics]")
            page.fill("#class_noun_animal", "guinea pig")
            page.fill("#name", "Biscuit")
            assert "a photo of Biscuit on the beach" in (page.text_content("[data-pack-prompts=pet-adventures]") or "")

            # Previews, a count, and removal.
            page.set_input_files("#photos", [str(path) for path in photo_files.values()])
            assert page.locator("[data-thumbs] .thumb").count() == 4
            assert "4 of 20 photos chosen" in page.inner_text("[data-photo-count]")

            # The server refuses the PDF: its preview is marked with the reason; nothing else is lost.
            page.check("input[name=consent]")
            page.click("[data-submit]")
            page.wait_for_selector("[data-form-errors] .alert")
            problem = page.locator(".thumb--problem")
            assert problem.count() == 1
            assert "not an image we can read (PDF?)" in problem.inner_text()
            assert "notes.jpg" in page.inner_text("[data-form-errors]")

            page.click("button[aria-label='Remove notes.jpg']")
            assert page.locator("[data-thumbs] .thumb").count() == 3
            page.click("[data-submit]")
            page.wait_for_url("**/studios/*-*-*-*-*")
            assert errors == []
        finally:
            browser.close()

    with sessionmaker(bind=clean_db)() as session:
        subject = session.scalars(select(Subject)).one()
    assert (subject.name, subject.kind, subject.class_noun) == ("Biscuit", "animal", "guinea pig")
    assert page.url.endswith(f"/studios/{subject.id}")
    assert [task.name for task in sent_tasks] == ["training.run"]

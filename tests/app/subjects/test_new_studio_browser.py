"""The new-studio page in a real browser (Debian's chromium through Playwright) against a live server
(``live_url`` of tests/app/conftest.py):
kind tiles, photo previews and removal, a refused photo marked with its reason, then the studio created;
then a person's studio whose face problems are marked on their photos."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import sessionmaker

from app.models import Subject, User
from tests import face_photos
from tests.app import photo_factory
from tests.app.conftest import PASSWORD
from tests.app.subjects.conftest import SentTask

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


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


@pytest.fixture
def person_files(tmp_path: Path) -> dict[str, Path]:
    """Three photos of one person, then a cat, a group photo and someone else."""
    files = {**dict(face_photos.person_uploads(3)),
             "cat.jpg": face_photos.jpeg(face_photos.cat().resize((902, 600))),
             "two-of-us.jpg": face_photos.jpeg(face_photos.side_by_side(face_photos.hopper(), face_photos.hopper())),
             "colleague.jpg": face_photos.jpeg(face_photos.collins())}
    folder = tmp_path / "person"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


def test_create_a_studio_in_the_browser(
    live_url: str,
    make_user: Callable[..., User],
    photo_files: dict[str, Path],
    person_files: dict[str, Path],
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
            # The page runs under the strict CSP: a blocked script or style shows up as a console error.
            page.on(
                "console",
                lambda message: errors.append(message.text) if "Content Security Policy" in message.text else None,
            )
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
            # Before it starts, the form says how long this studio will take (no GPU here: the demo model's speeds).
            estimate = page.locator("[data-time-estimate]")
            estimate.wait_for(state="visible")
            assert "will take" in estimate.inner_text() and "pictures" in estimate.inner_text()

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
            created_url = page.url

            # A person's studio: each face problem is marked on its photo.
            page.goto(f"{live_url}/studios/new")
            page.click("label.choice:has(input[value=person])")
            page.fill("#name", "Grace")
            page.set_input_files("#photos", [str(path) for path in person_files.values()])
            page.check("input[name=consent]")
            page.click("[data-submit]")
            page.wait_for_selector("[data-form-errors] .alert")
            problems = page.locator(".thumb--problem")
            marked = [problems.nth(index).text_content() or "" for index in range(problems.count())]
            assert len(marked) == 3, marked
            assert any("cat.jpg" in text and "no face found" in text for text in marked)
            assert any("two-of-us.jpg" in text and "shows 2 faces" in text for text in marked)
            assert any("colleague.jpg" in text and "shows someone else than the other 3 photos" in text
                       for text in marked)
            assert errors == []
        finally:
            browser.close()

    with sessionmaker(bind=clean_db)() as session:
        subject = session.scalars(select(Subject)).one()
    assert (subject.name, subject.kind, subject.class_noun) == ("Biscuit", "animal", "guinea pig")
    assert created_url.endswith(f"/studios/{subject.id}")
    assert [task.name for task in sent_tasks] == ["training.run"]


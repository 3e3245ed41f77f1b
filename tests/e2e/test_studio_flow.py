"""The whole studio as a person uses it: real Chromium, a live web server and a real Celery worker.

Sign up, create a studio with photos and see the per-file error for a bad one, follow the progress
to the end (the worker trains the tiny model on the CPU, on the file-system broker like `studio
up`), open the gallery, download the ZIP, delete the studio and check nothing of it is left.

With STUDIO_SCREENSHOTS=DIR the main pages are saved there as PNGs (docs/screenshots in the repo).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from app import config as config_module
from app.config import Settings
from app.main import create_app
from app.models import GeneratedImage, Job, Photo, Subject
from app.storage import LocalStorage
from tests.app import photo_factory
from tests.worker.processes import start_worker, stop_worker, worker_env

CHROMIUM = Path("/usr/bin/chromium")
TRAINING = {"steps": 200, "checkpoint_every": 100, "preview_every": 50}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


@pytest.fixture
def studio_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The embedded defaults (file-system broker, local media) on the test database."""
    values = settings.model_copy(update={"broker_url": ""})
    monkeypatch.setattr(config_module, "get_settings", lambda: values)
    return values


@pytest.fixture
def app(studio_settings: Settings, clean_db: Engine) -> FastAPI:
    return create_app(studio_settings)


@pytest.fixture
def worker(studio_settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = worker_env(studio_settings, TRAINING)
    process = start_worker(env, tmp_path / "worker.log", "flow")
    yield process
    stop_worker(process)


@pytest.fixture
def shots() -> Callable[..., None]:
    folder = os.environ.get("STUDIO_SCREENSHOTS")

    def shoot(target: object, name: str, full_page: bool = True) -> None:
        """A page (whole, or its first screenful) or one element of it (a Playwright locator)."""
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            options = {"full_page": full_page} if hasattr(target, "goto") else {}
            target.screenshot(path=str(Path(folder) / f"{name}.png"), **options)  # type: ignore[attr-defined]

    return shoot


def test_a_person_creates_follows_downloads_and_deletes_a_studio(
    live_url: str, worker: subprocess.Popen[bytes], studio_settings: Settings, clean_db: Engine,
    tmp_path: Path, shots: Callable[..., None],
) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    expect = playwright_api.expect
    photos = []
    for index in range(4):
        path = tmp_path / f"rex-{index}.jpg"
        path.write_bytes(photo_factory.make_photo(40 + index))
        photos.append(path)
    bad = tmp_path / "vet-bill.jpg"
    bad.write_bytes(photo_factory.make_fake_pdf())

    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page_errors: list[str] = []
            page.on("pageerror", lambda error: page_errors.append(str(error)))

            page.goto(live_url + "/")
            shots(page, "home")
            page.goto(live_url + "/signup")
            page.fill("#email", "rex.owner@example.com")
            page.fill("#password", "a long enough password")
            page.click("button[type=submit]")
            page.wait_for_url("**/studios**")

            page.goto(live_url + "/studios/new")
            page.fill("#name", "Rex")
            page.click("label.choice:has(input[value=dog])")
            page.set_input_files("#photos", [str(path) for path in [*photos, bad]])
            page.check("input[name=consent]")
            page.click("[data-submit]")
            page.wait_for_selector("[data-form-errors] .alert")
            assert "vet-bill.jpg" in page.inner_text("[data-form-errors]")
            shots(page, "new-studio")
            page.click("button[aria-label='Remove vet-bill.jpg']")
            page.click("[data-submit]")
            page.wait_for_url("**/studios/*-*-*-*-*")
            studio_url = page.url

            # The page follows the job by itself, through every stage, to the end.
            label = page.locator("[data-stage-label]")
            expect(label).to_have_text(re.compile("Training step|Failed|ready|Done"), timeout=150_000)
            assert "Failed" not in label.inner_text()
            expect(page.locator("[data-demo-notice]")).to_be_visible()  # the worker runs the tiny demo model
            # Live previews of the model being trained appear on the page as training goes.
            expect(page.locator("[data-preview-grid] img").first).to_be_visible(timeout=150_000)
            shots(page, "studio")
            expect(page.locator("[data-outcome=done]")).to_be_visible(timeout=180_000)
            assert page.url == studio_url

            page.click("a[data-gallery-link]")
            page.wait_for_url("**/gallery")
            images = page.locator(".gallery-groups img")
            assert images.count() >= 2
            shots(page, "gallery", full_page=False)  # the first screenful: images further down load lazily

            with page.expect_download() as download_info:
                page.click("a[href$='download.zip']")
            archive = zipfile.ZipFile(io.BytesIO(Path(download_info.value.path()).read_bytes()))
            names = archive.namelist()
            assert "manifest.json" in names
            assert len([name for name in names if name.endswith(".png")]) == images.count()

            # The trained LoRA, as AUTOMATIC1111 and ComfyUI load it: kohya-ss names in a safetensors file.
            expect(page.locator("#model")).to_contain_text("demo model")
            shots(page.locator("#model"), "model")
            with page.expect_download() as model_download:
                page.click("#model a[href$='/model/a1111']")
            lora = Path(model_download.value.path()).read_bytes()
            header = json.loads(lora[8:8 + int.from_bytes(lora[:8], "little")])
            assert any(name.startswith("lora_unet_") for name in header), list(header)[:5]

            page.goto(studio_url + "/delete")
            shots(page, "delete")
            page.click("button:has-text('Delete everything')")
            page.wait_for_url("**/studios")
            assert "were deleted" in page.inner_text("main")
            assert page.locator(".studio-card").count() == 0
            assert page_errors == []
        finally:
            browser.close()

    subject_id = uuid.UUID(studio_url.rstrip("/").rsplit("/", 1)[-1])
    storage = LocalStorage(studio_settings.resolved_media_dir)
    leftover = [key for key in storage.list("users/") if str(subject_id) in key]
    assert leftover == []
    with Session(clean_db) as session:
        assert session.get(Subject, subject_id) is None
        for model in (Job, Photo, GeneratedImage):
            count = select(func.count()).select_from(model).where(model.subject_id == subject_id)  # type: ignore[attr-defined]
            assert session.execute(count).scalar_one() == 0

"""Choosing the base model, as a person does it: real Chromium, a live web server and a real Celery worker.

The operator offers two models ("tiny", an SD 1.x demo model, and "tiny-sdxl", an SDXL one). The
person picks the second on the new-studio form; the worker trains that one (on the CPU, on the
file-system broker like `studio up`); the finished studio's page and the gallery's model card name
it, its family as the worker detected it, and its licence; its AUTOMATIC1111 download is an SDXL
kohya-ss file.
"""

from __future__ import annotations

import io
import json
import subprocess
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app import config as config_module
from app.config import BaseModelOption, Settings
from app.main import create_app
from app.models import Subject
from tests.app import photo_factory
from tests.worker.processes import start_worker, stop_worker, worker_env

CHROMIUM = Path("/usr/bin/chromium")
# Few steps: this test is about which model is trained, not how well (tiny-sdxl is slower than tiny on a CPU).
TRAINING = {"steps": 12, "checkpoint_every": 6, "preview_every": 6}
SD_LICENCE = "CreativeML OpenRAIL-M"
XL_LICENCE = "CreativeML Open RAIL++-M"
XL_LICENCE_URL = "https://github.com/Stability-AI/generative-models/blob/main/model_licenses/LICENSE-SDXL1.0"
MODELS = [
    BaseModelOption(key="tiny", name="Tiny SD (demo)", spec="tiny", licence=SD_LICENCE),
    BaseModelOption(key="tiny-xl", name="Tiny SDXL (demo)", spec="tiny-sdxl", licence=XL_LICENCE,
                    licence_url=XL_LICENCE_URL),
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


@pytest.fixture
def studio_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The embedded defaults (file-system broker, local media) on the test database, with two models."""
    values = settings.model_copy(update={"broker_url": "", "base_models": MODELS})
    monkeypatch.setattr(config_module, "get_settings", lambda: values)
    return values


@pytest.fixture
def app(studio_settings: Settings, clean_db: Engine) -> FastAPI:
    return create_app(studio_settings)


@pytest.fixture
def worker(studio_settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = worker_env(studio_settings, TRAINING)
    # The worker reads the same list as the web process; what it trains is the spec the studio recorded.
    env["STUDIO_BASE_MODELS"] = json.dumps([model.model_dump() for model in MODELS])
    process = start_worker(env, tmp_path / "worker.log", "models")
    yield process
    stop_worker(process)


def test_a_person_picks_the_second_model_and_the_studio_names_it_with_its_licence(
    live_url: str, worker: subprocess.Popen[bytes], studio_settings: Settings, clean_db: Engine, tmp_path: Path,
) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    expect = playwright_api.expect
    photos = []
    for index in range(4):
        path = tmp_path / f"rex-{index}.jpg"
        path.write_bytes(photo_factory.make_photo(60 + index))
        photos.append(path)

    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page_errors: list[str] = []
            page.on("pageerror", lambda error: page_errors.append(str(error)))

            page.goto(live_url + "/signup")
            page.fill("#email", "model.picker@example.com")
            page.fill("#password", "a long enough password")
            page.click("button[type=submit]")
            page.wait_for_url("**/studios**")

            page.goto(live_url + "/studios/new")
            cards = page.locator("[data-base-models] label.choice")
            expect(cards).to_have_count(2)
            expect(cards.nth(0)).to_contain_text("Tiny SD (demo)")
            expect(cards.nth(0)).to_contain_text(SD_LICENCE)
            expect(cards.nth(1)).to_contain_text("Tiny SDXL (demo)")
            expect(cards.nth(1).locator(f"a[href='{XL_LICENCE_URL}']")).to_have_text(XL_LICENCE)
            expect(page.locator("input[name=base_model][value=tiny]")).to_be_checked()  # the default: the first

            page.fill("#name", "Rex")
            page.click("label.choice:has(input[value=dog])")
            page.click("label.choice:has(input[name=base_model][value=tiny-xl]) .choice__title")
            expect(page.locator("input[name=base_model][value=tiny-xl]")).to_be_checked()
            page.select_option("#images_per_prompt", "1")  # a quicker gallery: sampling is not what is tested
            page.set_input_files("#photos", [str(path) for path in photos])
            page.check("input[name=consent]")
            page.click("[data-submit]")
            page.wait_for_url("**/studios/*-*-*-*-*")
            studio_url = page.url

            # The choice is on the page from the start; the family once the worker has loaded the model.
            model_card = page.locator("[data-base-model]")
            expect(model_card).to_contain_text("Tiny SDXL (demo)")
            expect(model_card).to_contain_text(XL_LICENCE)
            expect(page.locator("[data-outcome=done]")).to_be_visible(timeout=600_000)
            assert "Failed" not in page.locator("[data-stage-label]").inner_text()

            page.reload()
            expect(page.locator("[data-base-model-name]")).to_have_text("Tiny SDXL (demo)")
            expect(page.locator("[data-base-model-family]")).to_have_text("Stable Diffusion XL")
            expect(page.locator("[data-base-model-licence] a")).to_have_text(XL_LICENCE)

            page.click("a[data-gallery-link]")
            page.wait_for_url("**/gallery")
            card = page.locator("#model")
            expect(card.locator("[data-model-base]")).to_contain_text("Tiny SDXL (demo) · Stable Diffusion XL")
            expect(card.locator("[data-model-base]")).to_contain_text("tiny-sdxl")
            expect(card.locator("[data-model-licence] a")).to_have_text(XL_LICENCE)

            # The AUTOMATIC1111 download of an SDXL studio: SDXL's kohya-ss names.
            with page.expect_download() as model_download:
                page.click("#model a[href$='/model/a1111']")
            lora = Path(model_download.value.path()).read_bytes()
            header = json.loads(lora[8:8 + int.from_bytes(lora[:8], "little")])
            assert any(name.startswith("lora_unet_") for name in header), list(header)[:5]
            with page.expect_download() as zip_download:
                page.click("#model a[href$='/model/zip']")
            archive = zipfile.ZipFile(io.BytesIO(Path(zip_download.value.path()).read_bytes()))
            manifest = json.loads(archive.read("manifest.json"))
            assert manifest["base_model"] == "tiny-sdxl"
            assert manifest["base_model_info"]["name"] == "Tiny SDXL (demo)"
            assert manifest["base_model_info"]["family"] == "Stable Diffusion XL"
            assert manifest["base_model_info"]["licence"] == XL_LICENCE
            assert page_errors == []
        finally:
            browser.close()

    subject_id = uuid.UUID(studio_url.rstrip("/").rsplit("/", 1)[-1])
    with Session(clean_db) as session:
        subject = session.get(Subject, subject_id)
        assert subject is not None and subject.base_model == "tiny-sdxl"
        assert subject.model_info["family"] == "sdxl"
        assert subject.base_model_choice is not None and subject.base_model_choice["key"] == "tiny-xl"

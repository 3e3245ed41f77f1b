"""Every page as a person sees it, in real Chromium (Debian's, through Playwright), at a phone's size
(360×740, touch) and on a desktop, against a live server with studios made directly in the database.

What issue 15's newcomer stumbled on, checked where it shows:

- no page is wider than the screen at 360 px (a long email, the model card's long download button);
- every date reads the same, in the browser's time zone, whether the server or the page's script
  wrote it;
- the studio page's picture count follows a finished "generate more" without a reload;
- a new studio offers no "keep it longer" that would add nothing;
- the gallery's "best likeness first" starts with the best picture, and its lightbox walks the same
  order as the one-picture page;
- a finished studio whose photos are gone shows its best picture as its cover;
- seed, guidance and the likeness scores wait behind "Technical details"; a phone is offered
  "Choose photos", not "Drop photos here";
- a bad password on sign-up puts the focus on the password field;
- renaming, "More like this", deleting one picture and share links work from the pages, and the
  browser tells the person when the studio's job is done while its page is open.

With STUDIO_SCREENSHOTS=DIR the pages are saved there as PNGs (docs/screenshots in the repo):
``phone-*.png`` at 360×740 and a few desktop pages.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.models import GeneratedImage, Job, Subject, User, utcnow
from app.storage import Storage
from tests.app.conftest import PASSWORD
from tests.app.factories import make_image, make_job, make_photo, make_subject, png_bytes

expect = pytest.importorskip("playwright.sync_api").expect

CHROMIUM = Path("/usr/bin/chromium")
PHONE = {"width": 360, "height": 740}
DESKTOP = {"width": 1280, "height": 860}
ZONE = "Europe/Berlin"  # not UTC, so a date in the wrong zone shows
LONG_EMAIL = "rex.and.bella.owner.with.a.long.address@a-rather-long-example-domain-name.example.com"
LIKENESS_ORDER_JS = ("Array.from(document.querySelectorAll('[data-gallery] [data-image-id]'))"
                     ".map(e => e.dataset.imageId)")
# What the server wrote into every <time>, and what the page's own formatter makes of the same moment.
TIMES_JS = """() => Array.from(document.querySelectorAll('time[data-when]')).map(t =>
  [t.textContent, window.StudioDates.format(t.getAttribute('datetime'), t.getAttribute('data-when'))])"""

# The browser's notifications, recorded instead of shown (a headless browser shows none); permission granted.
FAKE_NOTIFICATIONS_JS = """window.__notes = [];
window.Notification = class { constructor(title) { window.__notes.push(title); } close() {}
  static get permission() { return "granted"; } static requestPermission() { return Promise.resolve("granted"); } };"""

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


@pytest.fixture
def browser() -> Iterator[Any]:
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def shots() -> Callable[[Any, str], None]:
    folder = os.environ.get("STUDIO_SCREENSHOTS")

    def shoot(page: Any, name: str) -> None:
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(Path(folder) / f"{name}.png"))  # the first screenful: small files

    return shoot


def seed_studios(engine: Engine, storage: Storage, user: User) -> dict[str, Any]:
    """Rex: trained, photos removed, a gallery of ranked pictures over three prompts and a model to
    download. Bella: new, with her photos, waiting in line."""
    with Session(engine, expire_on_commit=False) as session:
        rex = make_subject(session, user, name="Rex", identifier="qzx", weights_key=f"users/{user.id}/w/",
                           base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", photos_deleted_at=utcnow(),
                           model_info={"demo_model": False, "weights_files": ["lora_kohya.safetensors",
                                                                               "pytorch_lora_weights.safetensors"]})
        trained = make_job(session, rex, status="done", stage="finished", started_at=utcnow(), finished_at=utcnow())
        prompts = ("a photo of {subject} on the beach at sunset", "a photo of {subject} playing in the snow",
                   "an oil painting portrait of {subject}, classic style")
        images: list[GeneratedImage] = []
        for index in range(9):
            # The best picture (rank 1) is the last prompt's: "best likeness first" must still show it first.
            rank = {8: 1, 0: 2}.get(index, index + 2)
            images.append(make_image(session, storage, rex, trained, prompts[index // 3], seed=index,
                                     data=png_bytes(index, 96), width=96, height=96, rank=rank, dino=0.5 + index / 20,
                                     clip_i=0.7, clip_t=-0.01))
        bella = make_subject(session, user, name="Bella")
        for position in range(3):
            make_photo(session, storage, bella, position)
        make_job(session, bella)
        session.commit()
    return {"rex": rex, "bella": bella, "trained": trained, "images": images, "best": images[8]}


def assert_fits(page: Any, where: str) -> None:
    """Nothing wider than the screen: the page does not scroll sideways. (A phone widens its layout to
    what the page needs, so innerWidth grows with the page: the screen is the viewport the test set.)"""
    screen = page.viewport_size["width"]
    width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert max(width) <= screen, f"{where} is {max(width)} px wide on a {screen} px screen"


def assert_one_date_format(page: Any, where: str) -> None:
    pairs = page.evaluate(TIMES_JS)
    for shown, formatted in pairs:
        assert shown == formatted, f"{where}: {shown!r} but the page's formatter writes {formatted!r}"
        assert re.fullmatch(r"\d{1,2} [A-Z][a-z]{2} \d{4}(, \d\d:\d\d UTC\+1)?", shown), shown


def test_every_page_fits_a_phone_and_reads_like_a_product(
    live_url: str, app: FastAPI, clean_db: Engine, make_user: Callable[..., User], browser: Any,
    shots: Callable[[Any, str], None],
) -> None:
    storage: Storage = app.state.storage
    user = make_user(LONG_EMAIL)
    studios = seed_studios(clean_db, storage, user)
    rex, bella = studios["rex"], studios["bella"]
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True, timezone_id=ZONE)
    context.add_init_script(FAKE_NOTIFICATIONS_JS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    # Signing up with a short password: the focus is where the problem is.
    page.goto(f"{live_url}/signup")
    assert_fits(page, "/signup")
    page.fill("#email", "new.person@example.com")
    page.fill("#password", "short")
    page.click("button[type=submit]")
    expect(page.locator("#password")).to_be_focused()

    page.goto(f"{live_url}/login?next=/studios")
    page.fill("#email", LONG_EMAIL)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/studios")

    rex_url, bella_url = f"/studios/{rex.id}", f"/studios/{bella.id}"
    best_url = f"{rex_url}/images/{studios['best'].id}"
    pages = {"home": "/", "studios": "/studios", "new-studio": "/studios/new", "studio": bella_url,
             "trained-studio": rex_url, "gallery": f"{rex_url}/gallery", "image": best_url,
             "delete": f"{rex_url}/delete", "account": "/account", "not-found": "/studios/nope"}
    for name, path in pages.items():
        page.goto(live_url + path)
        assert_fits(page, path)
        assert_one_date_format(page, path)
        shots(page, f"phone-{name}")
    # The login and sign-up pages, for a visitor.
    visitor = browser.new_page(viewport=PHONE)
    for path in ("/login", "/signup"):
        visitor.goto(live_url + path)
        assert_fits(visitor, path)

    # The server writes dates in the zone the browser reported, exactly as the script does.
    served = page.request.get(f"{live_url}{rex_url}").text()
    written = re.findall(r'<time datetime="[^"]+" data-when="\w+">([^<]+)</time>', served)
    assert written and all("UTC+1" in text for text in written if "," in text)
    page.goto(live_url + rex_url)
    assert [shown for shown, _ in page.evaluate(TIMES_JS)] == written

    # A phone cannot drop files: the photo picker says what a tap does.
    page.goto(f"{live_url}/studios/new")
    expect(page.locator(".dropzone__title .when-pointer")).to_be_hidden()
    assert page.locator(".dropzone__title").inner_text().strip() == "Choose photos"

    # A new studio: no "keep it longer" that would answer with the date it already has.
    page.goto(live_url + bella_url)
    expect(page.locator("[data-renew]")).to_have_count(0)

    # A finished studio whose photos are gone shows its best picture.
    page.goto(f"{live_url}/studios")
    cover = page.locator(f'a[href="{rex_url}"] [data-cover=best-picture] img')
    expect(cover).to_have_attribute("src", f"{best_url}/file")

    # Best likeness first: the best picture leads, whatever its prompt; the lightbox walks the page's
    # order, and the one-picture page's "Next" the same.
    page.goto(f"{live_url}{rex_url}/gallery")
    order = page.evaluate(LIKENESS_ORDER_JS)
    assert order[0] == str(studios["best"].id)
    expect(page.locator("[data-tech-details]")).to_have_count(0)
    page.click(f'[data-image-id="{order[0]}"] [data-lightbox-item]')
    expect(page.locator("[data-lightbox-counter]")).to_have_text(f"1 / {len(order)}")
    page.keyboard.press("ArrowRight")
    expect(page.locator("[data-lightbox-image]")).to_have_attribute("src", re.compile(order[1]))
    page.keyboard.press("Escape")
    page.goto(f"{live_url}{best_url}")
    page.click("a[rel=next]")
    page.wait_for_url(f"**/images/{order[1]}*")

    # The picture page leads with a customer's words; the numbers wait behind "Technical details".
    page.goto(f"{live_url}{best_url}")
    details = page.locator("[data-tech-details]")
    expect(details.locator("dd").first).to_be_hidden()
    expect(page.locator("main")).to_contain_text("the best likeness of Rex")
    details.locator("summary").click()
    expect(details).to_contain_text("Seed")
    expect(details).to_contain_text("DINO")

    # Delete one picture (the page asks first), then "More like this" on another.
    page.goto(f"{live_url}{rex_url}/images/{order[-1]}")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("[data-delete-picture]")
    page.wait_for_url(f"**{rex_url}/gallery")
    expect(page.locator("[data-gallery] [data-image-id]")).to_have_count(len(order) - 1)
    page.goto(f"{live_url}{best_url}")
    shots(page, "phone-image-details")
    page.click("[data-more-like-this]")
    page.wait_for_url(f"**{rex_url}")
    expect(page.locator("[data-stage-label]")).to_have_text(re.compile("in line"))

    expect(page.locator("[data-notify-state]")).to_contain_text("We will tell you here when it is ready")

    # The "generate more" job finishes while the page is open: the count follows without a reload, and
    # the browser says so.
    link = page.locator("[data-gallery-link]")
    expect(link).to_have_text(re.compile(rf"\({len(order) - 1}\)"))
    with Session(clean_db, expire_on_commit=False) as session:
        job = session.query(Job).filter(Job.subject_id == rex.id, Job.kind == "generate").one()
        trained_rex = session.get(Subject, rex.id)
        assert trained_rex is not None
        for seed in range(4):
            make_image(session, storage, trained_rex, job, "a photo of {subject} on the beach at sunset",
                       seed=100 + seed)
        job.status, job.stage, job.started_at, job.finished_at = "done", "finished", utcnow(), utcnow()
        session.commit()
    expect(page.locator("[data-outcome=done]")).to_be_visible(timeout=20_000)
    expect(link).to_have_text(re.compile(rf"\({len(order) + 3}\)"), timeout=20_000)
    assert page.evaluate("window.__notes") == ["Rex's pictures are ready"]
    # The "Started" date the script wrote reads like the server's.
    expect(page.locator("[data-started] time")).to_have_text(re.compile(r"^\d{1,2} [A-Z][a-z]{2} \d{4}, .* UTC\+1$"))
    assert_one_date_format(page, rex_url)

    # Share the gallery: the link opens for someone without an account (on a phone too), and shows
    # nothing once turned off.
    page.goto(f"{live_url}{rex_url}/gallery#share")
    page.click("[data-share-form] button[type=submit]")
    shared_url = page.locator("[data-share-url]").first.input_value()
    assert shared_url.startswith(f"{live_url}/s/")
    outsider = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True, timezone_id=ZONE)
    shared = outsider.new_page()
    shared.goto(shared_url)
    expect(shared.locator("[data-shared] img")).to_have_count(len(order) + 3)
    assert_fits(shared, "/s/…")
    shots(shared, "phone-shared")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("[data-share-revoke]")
    expect(page.locator("[data-share-revoke]")).to_have_count(0)
    assert shared.goto(shared_url).status == 404
    outsider.close()

    # Rename.
    page.goto(live_url + rex_url)
    page.click("[data-rename] summary")
    page.fill("#rename-name", "Rex the Brave")
    page.click("[data-rename] button[type=submit]")
    expect(page.locator("h1")).to_have_text("Rex the Brave")
    assert errors == []

    # The desktop: the same pages fit and a few are kept as pictures.
    desktop = browser.new_context(viewport=DESKTOP, timezone_id=ZONE)
    desktop.add_cookies(context.cookies())
    wide = desktop.new_page()
    for name, path in (("studios", "/studios"), ("image", best_url), ("account", "/account")):
        wide.goto(live_url + path)
        assert_fits(wide, path)
        shots(wide, f"desktop-{name}")
    with sessionmaker(bind=clean_db)() as session:
        assert session.get(Subject, rex.id).name == "Rex the Brave"  # type: ignore[union-attr]

"""Accounts in a real browser (Debian's chromium through Playwright): the pages run under the strict
CSP without a single violation, sign-up signs in, the phone menu opens, the token copy works, and
logging out from the account menu ends the session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from app.models import User
from tests.app.conftest import PASSWORD

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


def test_sign_up_tokens_and_log_out_on_a_phone(live_url: str, make_user: Callable[..., User]) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 375, "height": 800}, is_mobile=True, has_touch=True)
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("console", lambda message: problems.append(message.text)
                    if "Content Security Policy" in message.text else None)

            page.goto(f"{live_url}/")
            page.get_by_role("link", name="Sign up").click()
            page.fill("#email", "phone@example.com")
            page.fill("#password", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{live_url}/studios")
            assert page.locator(".flash").inner_text().startswith("Welcome to the studio!")
            page.click("[data-dismiss]")
            assert page.locator(".flash").count() == 0  # studio.js runs: the CSP allows our own script

            page.goto(f"{live_url}/account")
            page.fill("#token-name", "phone script")
            page.click("form[action='/account/tokens'] button[type=submit]")
            token = page.input_value("#new-token")
            assert token.startswith("studio_")

            nav = page.locator("#topbar-nav")
            assert not nav.is_visible()
            page.click("[data-nav-toggle]")
            assert nav.is_visible()
            page.click("summary.menu__button")
            page.get_by_role("button", name="Log out").click()
            page.wait_for_url(f"{live_url}/")
            assert "You are logged out." in page.locator(".flash").inner_text()
            page.goto(f"{live_url}/account")
            assert page.url.startswith(f"{live_url}/login?next=")
            assert problems == []
        finally:
            browser.close()

"""The account's email flows in a real browser (Debian's chromium), with the messages going through a
real SMTP server on loopback: sign up, confirm the address from the email, forget the password and
reset it from the email, then delete the account, which sends a last email."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import Settings
from tests.app.conftest import PASSWORD
from tests.mailbox import Mailbox, link_in

CHROMIUM = Path("/usr/bin/chromium")
NEW_PASSWORD = "a brand new passphrase"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


def test_sign_up_confirm_reset_the_password_and_delete_the_account(live_url: str, settings: Settings,
                                                                   mailbox: Mailbox) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    settings.base_url = live_url  # the links in the messages lead to this server
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("dialog", lambda dialog: dialog.accept())  # "Delete your account ...?"
            page.goto(f"{live_url}/signup")
            page.fill("#email", "web@example.com")
            page.fill("#password", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{live_url}/studios")

            page.goto(link_in(mailbox.wait_for(1)[0], "/verify-email"))
            page.wait_for_url(f"{live_url}/account")
            assert "your email address is confirmed" in page.locator(".flash").inner_text()
            assert page.locator("[data-email-status=confirmed]").count() == 1

            page.click("summary.menu__button")
            page.get_by_role("button", name="Log out").click()
            page.goto(f"{live_url}/login")
            page.get_by_role("link", name="Forgot your password?").click()
            page.fill("#email", "web@example.com")
            page.click("button[type=submit]")
            assert page.locator("[data-reset-sent]").is_visible()
            page.goto(link_in(mailbox.wait_for(2)[1], "/password/reset"))
            page.fill("#password", NEW_PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{live_url}/login")
            page.fill("#email", "web@example.com")
            page.fill("#password", NEW_PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{live_url}/studios")
            assert mailbox.wait_for(3)[2]["Subject"] == "Your password was reset"

            page.goto(f"{live_url}/account")
            page.fill("#delete-password", NEW_PASSWORD)
            page.get_by_role("button", name="Delete my account").click()
            page.wait_for_url(f"{live_url}/")
            assert "Your account is deleted" in page.locator(".flash").inner_text()
            assert mailbox.wait_for(4)[3]["Subject"] == "Your account is deleted"
        finally:
            browser.close()

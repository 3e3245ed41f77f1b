"""The API docs page in a real browser: Swagger UI, served from this site, renders the schema under
its own CSP without a violation and without asking any other host for anything."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]


def test_api_docs_render_from_this_site_only(live_url: str) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            problems: list[str] = []
            hosts: set[str] = set()
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("console", lambda message: problems.append(message.text)
                    if "Content Security Policy" in message.text else None)
            page.on("request", lambda request: hosts.add(urlsplit(request.url).netloc)
                    if request.url.startswith("http") else None)

            page.goto(f"{live_url}/api/v1/docs")
            page.wait_for_selector(".swagger-ui .info .title", timeout=15_000)
            assert "Photo studio" in page.locator(".swagger-ui .info .title").inner_text()
            assert page.locator(".opblock-summary-path").filter(has_text="/api/v1/jobs/{job_id}").count() >= 1
            assert hosts == {urlsplit(live_url).netloc}
            assert problems == []
        finally:
            browser.close()

"""End-to-end fixtures: the web app's live server and fast password hashing, shared with tests/app."""

from tests.app.conftest import fast_password_hashing, live_url

__all__ = ["fast_password_hashing", "live_url"]

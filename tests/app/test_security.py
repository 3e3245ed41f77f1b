"""Security primitives: redirects, tokens, the login rate limiter."""

from __future__ import annotations

import pytest

from app.security import LoginRateLimiter, hash_token, new_api_token, safe_next, tokens_equal


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/studios", "/studios"),
        ("/studios/1?tab=gallery#top", "/studios/1?tab=gallery#top"),
        (None, "/"),
        ("", "/"),
        ("studios", "/"),
        ("//evil.example", "/"),
        ("/\\evil.example", "/"),
        ("https://evil.example/studios", "/"),
        ("javascript:alert(1)", "/"),
        ("/\x00studios", "/"),
        ("/studios\r\nSet-Cookie: x=1", "/"),
    ],
)
def test_safe_next(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def test_tokens() -> None:
    first, second = new_api_token(), new_api_token()
    assert first != second and first.startswith("studio_") and len(first) > 40
    assert hash_token(first) == hash_token(first) and len(hash_token(first)) == 64
    assert tokens_equal("abc", "abc")
    assert not tokens_equal("abc", "abd")
    assert not tokens_equal(None, None) and not tokens_equal("", "")


def test_rate_limiter_window() -> None:
    limiter = LoginRateLimiter(max_failures=3, window_seconds=60)
    for moment in (0.0, 10.0, 20.0):
        assert limiter.retry_after("1.2.3.4", now=moment) is None
        limiter.record_failure("1.2.3.4", now=moment)
    assert limiter.retry_after("1.2.3.4", now=21.0) == 39  # the failure at 0 s leaves the window at 60 s
    assert limiter.retry_after("5.6.7.8", now=21.0) is None  # other clients are not affected
    assert limiter.retry_after("1.2.3.4", now=60.5) is None
    limiter.record_failure("1.2.3.4", now=61.0)
    assert limiter.retry_after("1.2.3.4", now=61.0) is not None
    limiter.reset("1.2.3.4")
    assert limiter.retry_after("1.2.3.4", now=61.0) is None


def test_rate_limiter_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_failures"):
        LoginRateLimiter(max_failures=0)
    with pytest.raises(ValueError, match="window_seconds"):
        LoginRateLimiter(window_seconds=0)


def test_rate_limiter_forgets_expired_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LoginRateLimiter, "SWEEP_ABOVE_KEYS", 5)
    limiter = LoginRateLimiter(max_failures=3, window_seconds=60)
    for number in range(5):
        limiter.record_failure(f"10.0.0.{number}", now=0.0)
    assert limiter.tracked_keys() == 5
    limiter.record_failure("10.0.1.1", now=100.0)  # the sixth client: the old ones have expired and go
    assert limiter.tracked_keys() == 1

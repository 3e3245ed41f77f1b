"""Security primitives: redirects, tokens, the login rate limiter."""

from __future__ import annotations

import pytest

from app.security import hash_token, new_api_token, safe_next, tokens_equal


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


"""Security primitives of the web app: password hashing, random tokens, redirect targets.

Nothing here touches the database or the request: the accounts service and the dependencies in
``app.deps`` build on these.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

SESSION_COOKIE = "studio_session"
# Before someone signs in there is no server-side session to hold a CSRF token, so the login and
# sign-up forms are protected by a random token kept in this cookie (double submit).
ANONYMOUS_CSRF_COOKIE = "studio_csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FORM_FIELD = "csrf_token"
API_TOKEN_PREFIX = "studio_"

MIN_PASSWORD_LENGTH = 10
# Hashing a megabyte-long password would be a cheap way to burn the server's CPU.
MAX_PASSWORD_LENGTH = 1024

# argon2-cffi's defaults (RFC 9106 low-memory profile). Tests swap in a cheaper hasher.
password_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (salted; two calls give different strings)."""
    return password_hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """Whether ``password`` matches ``password_hash``; a malformed hash is simply a mismatch."""
    try:
        return password_hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def password_needs_rehash(password_hash: str) -> bool:
    """Whether the hash was made with weaker parameters than the current hasher's."""
    try:
        return password_hasher.check_needs_rehash(password_hash)
    except InvalidHashError:
        return True


def new_token(nbytes: int = 32) -> str:
    """A URL-safe random token with ``nbytes`` bytes of entropy."""
    return secrets.token_urlsafe(nbytes)


def new_api_token() -> str:
    """A bearer token; the prefix makes a leaked one easy to recognise (and to scan for)."""
    return API_TOKEN_PREFIX + new_token(32)


def hash_token(token: str) -> str:
    """The SHA-256 hex digest stored instead of a session or API token.

    Tokens carry 256 random bits, so a fast unsalted hash is enough: nobody can brute-force them,
    and a database leak still does not hand out working tokens.
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def tokens_equal(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison of two tokens; a missing one never matches."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


def safe_next(target: str | None, default: str = "/") -> str:
    """``target`` when it is a path on this site, otherwise ``default``.

    Only absolute paths are accepted ("/studios?x=1"); anything with a scheme or host, a
    protocol-relative "//evil.example", a backslash (browsers read "/\\evil" as "//evil") or a
    control character falls back, so ``?next=`` can never send someone to another site.
    """
    if not target or not target.startswith("/") or target.startswith("//"):
        return default
    if "\\" in target or any(ord(char) < 32 or ord(char) == 127 for char in target):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return target

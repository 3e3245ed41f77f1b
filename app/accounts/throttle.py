"""The sign-in throttle and the sign-up limit.

Failed password checks are counted per address, per account and on the account page:

- ``CLIENT``: failures from one address, so one machine cannot guess quickly;
- ``ACCOUNT``: failures against one email from anywhere, so a botnet cannot guess one person's
  password from many addresses (the price: under such an attack that person waits too);
- ``PASSWORD_CHANGE``: wrong current passwords on the account page, per account, so a stolen
  session cookie does not allow guessing the password.

Failures are recorded with :func:`app.rate_limits.record_apart`: the answer to a failure may roll
the request's transaction back.

Sign-ups (accounts created) are counted per address, ``settings.max_signups_per_hour``: without a
limit, one address could make accounts without end, each with its own per-account limits.
"""

from __future__ import annotations

from datetime import timedelta

from fastapi import Request

from app.config import Settings
from app.deps import client_key
from app.rate_limits import Counter, Limit

CLIENT = Limit("client", 10, timedelta(minutes=5))
ACCOUNT = Limit("account", 20, timedelta(minutes=15))
PASSWORD_CHANGE = Limit("password", 10, timedelta(minutes=5))
# Password-reset requests: per address, and per typed email (counted whether or not an account has it,
# so the limit says nothing about who has one). Confirmation messages asked for again, per account.
RESET_CLIENT = Limit("reset-client", 5, timedelta(hours=1))
RESET_EMAIL = Limit("reset-email", 3, timedelta(hours=1))
VERIFY_RESEND = Limit("verify-resend", 3, timedelta(hours=1))

# The scopes whose counters count an account (by its id) or its email: deleting the account deletes
# their rows. "studios" is app.subjects.service's studios-per-hour counter. Counters of an address
# (client, signup, reset-client) cannot be tied to one account and leave within two hours anyway.
SCOPES_BY_ACCOUNT_ID = ("studios", PASSWORD_CHANGE.scope, VERIFY_RESEND.scope)
SCOPES_BY_EMAIL = (ACCOUNT.scope, RESET_EMAIL.scope)


def sign_in_counters(request: Request, email: str) -> list[Counter]:
    """The address's counter first (a success clears it), then the account's (a success keeps it:
    a botnet's one lucky guess must not clear the count of the others)."""
    return [(CLIENT, client_key(request)), (ACCOUNT, email)]


def reset_counters(request: Request, email: str) -> list[Counter]:
    return [(RESET_CLIENT, client_key(request)), (RESET_EMAIL, email)]


def sign_up_counter(request: Request, settings: Settings) -> Counter | None:
    """The counter of accounts created from the request's address; None when sign-ups are unlimited."""
    if settings.max_signups_per_hour <= 0:
        return None
    return (Limit("signup", settings.max_signups_per_hour, timedelta(hours=1)), client_key(request))

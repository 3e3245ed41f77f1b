"""Account pages: sign up, log in, log out, the account page with API tokens, confirming the address,
resetting a forgotten password, notifications and deleting the account."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse
from sqlalchemy.orm import Session
from starlette.responses import Response

from app import rate_limits
from app.accounts import email_flows, export, repository, service, throttle
from app.accounts.cookies import clear_session_cookie, set_session_cookie
from app.accounts.deletion import delete_account
from app.config import Settings
from app.deps import (
    AuthDep,
    OptionalUser,
    PageUser,
    PasswordHashSlot,
    SessionDep,
    SettingsDep,
    StorageDep,
    require_csrf,
)
from app.galleries.files import file_response
from app.models import User
from app.security import safe_next
from app.templating import redirect_with_flash, render

router = APIRouter(include_in_schema=False)

AFTER_LOGIN = "/studios"
FormText = Annotated[str, Form()]


def _signed_in_redirect(
    request: Request, session: Session, settings: Settings, user: User, next_path: str, message: str
) -> Response:
    """Start a browser session for ``user`` and send them on to ``next_path`` (when it is on this site)."""
    new_session = service.start_session(session, user, settings)
    response = redirect_with_flash(request, safe_next(next_path, AFTER_LOGIN), message)
    set_session_cookie(response, new_session.token, settings)
    return response


@router.get("/signup", name="signup")
def signup_page(request: Request, user: OptionalUser, settings: SettingsDep, next: str = "") -> Response:
    if user is not None:
        return RedirectResponse(safe_next(next, AFTER_LOGIN), status_code=303)
    context = {"errors": [], "email": "", "next": safe_next(next, "")}
    try:
        service.check_signups_open(settings)
    except service.SignupsClosed as closed:
        return render(request, "accounts/signup.html", {**context, "closed": closed.message})
    return render(request, "accounts/signup.html", context)


@router.post("/signup", dependencies=[PasswordHashSlot, Depends(require_csrf)])
def signup(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    email: FormText = "",
    password: FormText = "",
    next: FormText = "",
) -> Response:
    try:
        service.check_signups_open(settings)
        user = service.sign_up_counted(session, email, password, throttle.sign_up_counter(request, settings))
    except service.SignupsClosed as closed:
        closed_context = {"errors": [], "email": "", "next": safe_next(next, ""), "closed": closed.message}
        return render(request, "accounts/signup.html", closed_context, status_code=403)
    except service.TooManySignups as limited:
        limited_context = {"errors": [limited.message], "email": email.strip(), "next": safe_next(next, "")}
        return render(request, "accounts/signup.html", limited_context, status_code=429,
                      headers={"Retry-After": str(limited.retry_after)})
    except service.AccountError as error:
        session.rollback()
        context: dict[str, object] = {"errors": [error.message], "error_field": error.field, "email": email.strip(),
                   "next": safe_next(next, "")}
        status = 409 if isinstance(error, service.EmailTaken) else 400
        return render(request, "accounts/signup.html", context, status_code=status)
    email_flows.send_verification(session, settings, user)
    return _signed_in_redirect(request, session, settings, user, next,
                               f"Welcome to the studio! We sent a link to {user.email} to confirm your address.")


@router.get("/login", name="login")
def login_page(request: Request, user: OptionalUser, next: str = "") -> Response:
    if user is not None:
        return RedirectResponse(safe_next(next, AFTER_LOGIN), status_code=303)
    return render(request, "accounts/login.html", {"errors": [], "email": "", "next": safe_next(next, "")})


@router.post("/login", dependencies=[PasswordHashSlot, Depends(require_csrf)])
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    email: FormText = "",
    password: FormText = "",
    next: FormText = "",
) -> Response:
    counters = throttle.sign_in_counters(request, email)
    context = {"email": email.strip(), "next": safe_next(next, "")}
    retry_after = rate_limits.retry_after(session, counters)
    if retry_after is not None:
        message = f"Too many failed attempts. Try again in {rate_limits.wait_in_words(retry_after)}."
        return render(request, "accounts/login.html", {**context, "errors": [message]}, status_code=429,
                      headers={"Retry-After": str(retry_after)})
    user = service.authenticate(session, email, password)
    if user is None:
        rate_limits.record_apart(request.app.state.sessionmaker, counters)
        return render(request, "accounts/login.html", {**context, "errors": [service.LOGIN_FAILED_MESSAGE]},
                      status_code=400)
    rate_limits.reset(session, counters[:1])  # this address starts afresh; the account's count stays
    return _signed_in_redirect(request, session, settings, user, next, "Welcome back!")


@router.post("/logout", dependencies=[Depends(require_csrf)])
def logout(request: Request, session: SessionDep, settings: SettingsDep, auth: AuthDep) -> Response:
    if auth.user_session is not None:
        service.end_session(session, auth.user_session)
    response = redirect_with_flash(request, "/", "You are logged out.", kind="info")
    clear_session_cookie(response, settings)
    return response


def _account_page(request: Request, session: SessionDep, user: PageUser, status_code: int = 200,
                  **context: object) -> Response:
    tokens = repository.active_tokens(session, user.id)
    values: dict[str, object] = {
        "tokens": tokens,
        "new_token": None,
        "errors": [],
        "password_errors": [],
        "password_error_field": None,
        "other_sessions": len(repository.live_sessions(session, user.id)) - 1,
        "delete_errors": [],
        "exports": export.exports_of(session, user.id),
    }
    values.update(context)
    return render(request, "accounts/account.html", values, status_code=status_code)


@router.get("/account", name="account")
def account(request: Request, session: SessionDep, user: PageUser) -> Response:
    return _account_page(request, session, user)


@router.post("/account/tokens", dependencies=[Depends(require_csrf)])
def create_token(request: Request, session: SessionDep, user: PageUser, name: FormText = "") -> Response:
    try:
        created = service.create_api_token(session, user, name)
    except service.AccountError as error:
        session.rollback()
        return _account_page(request, session, user, status_code=400, errors=[error.message], token_name=name)
    # Rendered, not redirected: the raw token exists only in this response.
    return _account_page(request, session, user, status_code=201, new_token=created)


@router.post("/account/tokens/{token_id}/revoke", dependencies=[Depends(require_csrf)])
def revoke_token(request: Request, session: SessionDep, user: PageUser, token_id: uuid.UUID) -> Response:
    if not service.revoke_api_token(session, user, token_id):
        raise HTTPException(status_code=404, detail="No such token.")
    return redirect_with_flash(request, "/account", "The token is revoked: it no longer works.")


@router.post("/account/password", dependencies=[PasswordHashSlot, Depends(require_csrf)])
def change_password(
    request: Request,
    session: SessionDep,
    user: PageUser,
    auth: AuthDep,
    current_password: FormText = "",
    new_password: FormText = "",
) -> Response:
    # Counted per account: a stolen cookie must not allow guessing the password.
    counters = [(throttle.PASSWORD_CHANGE, str(user.id))]
    retry_after = rate_limits.retry_after(session, counters)
    if retry_after is not None:
        message = f"Too many wrong attempts. Try again in {rate_limits.wait_in_words(retry_after)}."
        return _account_page(request, session, user, status_code=429, password_errors=[message])
    try:
        ended = service.change_password(session, user, current_password, new_password, keep=auth.user_session)
    except service.AccountError as error:
        session.rollback()
        if error.field == "current_password":
            rate_limits.record_apart(request.app.state.sessionmaker, counters)
        return _account_page(request, session, user, status_code=400, password_errors=[error.message],
                             password_error_field=error.field)
    rate_limits.reset(session, counters)
    others = f" {ended} other device{'s' if ended != 1 else ''} signed out." if ended else ""
    tokens = len(repository.active_tokens(session, user.id))
    if tokens:
        # Tokens outlive a password change (see service.change_password): say so where it matters.
        others += (f" Your {tokens} API token{'s' if tokens != 1 else ''} still work{'s' if tokens == 1 else ''}:"
                   " revoke any you do not recognise, or sign out everywhere.")
    return redirect_with_flash(request, "/account", f"Your password is changed.{others}")


@router.post("/account/sessions/end-others", dependencies=[Depends(require_csrf)])
def end_other_sessions(request: Request, session: SessionDep, user: PageUser, auth: AuthDep) -> Response:
    ended = service.end_other_sessions(session, user, keep=auth.user_session)
    if not ended:
        return redirect_with_flash(request, "/account", "No other device was signed in.", kind="info")
    message = f"Signed out {ended} other device{'s' if ended != 1 else ''}."
    return redirect_with_flash(request, "/account", message)


@router.post("/account/sign-out-everywhere", dependencies=[Depends(require_csrf)])
def sign_out_everywhere(request: Request, session: SessionDep, settings: SettingsDep, user: PageUser) -> Response:
    """Every browser session (this one too) and every API token of the account stop working."""
    ended = service.sign_out_everywhere(session, user)
    tokens = f" and {ended.tokens} API token{'s' if ended.tokens != 1 else ''} revoked" if ended.tokens else ""
    message = f"Signed out everywhere: {ended.sessions} session{'s' if ended.sessions != 1 else ''} ended{tokens}."
    response = redirect_with_flash(request, "/login", message, kind="info")
    clear_session_cookie(response, settings)
    return response


# --- confirming the address ---------------------------------------------------------------------------


@router.get("/verify-email", name="verify_email")
def verify_email(request: Request, session: SessionDep, settings: SettingsDep, user: OptionalUser,
                 token: str = "") -> Response:
    """The link of the confirmation message. Signed in or not: the link itself names the account."""
    target = "/account" if user is not None else "/login"
    try:
        email_flows.verify_email(session, settings, token)
    except email_flows.LinkError as error:
        session.rollback()
        return redirect_with_flash(request, target, error.message, kind="warning")
    return redirect_with_flash(request, target, "Thank you: your email address is confirmed.")


@router.post("/account/verify/resend", dependencies=[Depends(require_csrf)])
def resend_verification(request: Request, session: SessionDep, settings: SettingsDep, user: PageUser) -> Response:
    if user.email_verified_at is not None:
        return redirect_with_flash(request, "/account", "Your address is already confirmed.", kind="info")
    counters = [(throttle.VERIFY_RESEND, str(user.id))]
    retry_after = rate_limits.retry_after(session, counters)
    if retry_after is not None:
        return redirect_with_flash(request, "/account", "We sent you several links already. Try again in "
                                   f"{rate_limits.wait_in_words(retry_after)}.", kind="warning")
    rate_limits.record(session, counters)
    email_flows.send_verification(session, settings, user)
    return redirect_with_flash(request, "/account", f"A new link is on its way to {user.email}.")


# --- a forgotten password ----------------------------------------------------------------------------


@router.get("/password/forgot", name="forgot_password")
def forgot_password_page(request: Request) -> Response:
    return render(request, "accounts/forgot.html", {"errors": [], "email": "", "sent": False})


@router.post("/password/forgot", dependencies=[Depends(require_csrf)])
def forgot_password(request: Request, session: SessionDep, settings: SettingsDep, email: FormText = "") -> Response:
    """The same answer whether or not an account has the address; limited per address and per email."""
    counters = throttle.reset_counters(request, email)
    retry_after = rate_limits.retry_after(session, counters)
    if retry_after is not None:
        message = f"Too many reset requests. Try again in {rate_limits.wait_in_words(retry_after)}."
        return render(request, "accounts/forgot.html", {"errors": [message], "email": email.strip(), "sent": False},
                      status_code=429, headers={"Retry-After": str(retry_after)})
    rate_limits.record(session, counters)
    email_flows.request_password_reset(session, settings, email)
    return render(request, "accounts/forgot.html",
                  {"errors": [], "email": "", "sent": True, "message": email_flows.RESET_REQUESTED_MESSAGE})


@router.get("/password/reset", name="reset_password")
def reset_password_page(request: Request, session: SessionDep, token: str = "") -> Response:
    try:
        email_flows.check_reset_link(session, token)
    except email_flows.LinkError as error:
        return render(request, "accounts/reset.html", {"errors": [error.message], "token": "", "usable": False},
                      status_code=400)
    return render(request, "accounts/reset.html", {"errors": [], "token": token, "usable": True})


@router.post("/password/reset", dependencies=[PasswordHashSlot, Depends(require_csrf)])
def reset_password(request: Request, session: SessionDep, settings: SettingsDep, token: FormText = "",
                   password: FormText = "") -> Response:
    try:
        email_flows.reset_password(session, settings, token, password)
    except email_flows.LinkError as error:
        session.rollback()
        return render(request, "accounts/reset.html", {"errors": [error.message], "token": "", "usable": False},
                      status_code=400)
    except service.AccountError as error:
        session.rollback()
        return render(request, "accounts/reset.html", {"errors": [error.message], "token": token, "usable": True},
                      status_code=400)
    response = redirect_with_flash(request, "/login", "Your password is changed, and every device and API token "
                                   "is signed out. Log in with the new password.")
    clear_session_cookie(response, settings)
    return response


# --- notifications and leaving ---------------------------------------------------------------------------


@router.post("/account/notifications", dependencies=[Depends(require_csrf)])
def set_notifications(request: Request, session: SessionDep, user: PageUser, notify: FormText = "") -> Response:
    """Turn the "your studio is ready / failed" emails on (``notify=on``) or off (anything else)."""
    user.notify_by_email = notify == "on"
    session.flush()
    message = ("You will get an email when a studio is ready or fails." if user.notify_by_email
               else "No more emails about your studios.")
    return redirect_with_flash(request, "/account", message)


@router.post("/account/delete", dependencies=[PasswordHashSlot, Depends(require_csrf)])
def delete_my_account(request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep,
                      user: PageUser, password: FormText = "") -> Response:
    """Delete the account and everything of it, after the password is typed again (counted like a change)."""
    counters = [(throttle.PASSWORD_CHANGE, str(user.id))]
    retry_after = rate_limits.retry_after(session, counters)
    if retry_after is not None:
        message = f"Too many wrong attempts. Try again in {rate_limits.wait_in_words(retry_after)}."
        return _account_page(request, session, user, status_code=429, delete_errors=[message])
    if not service.password_matches(user, password):
        rate_limits.record_apart(request.app.state.sessionmaker, counters)
        return _account_page(request, session, user, status_code=400,
                             delete_errors=["The password is wrong: your account is not deleted."])
    studios = delete_account(session, storage, settings, user)
    what = f" with its {studios} studio{'s' if studios != 1 else ''}" if studios else ""
    response = redirect_with_flash(request, "/", f"Your account is deleted{what}. Nothing of it is kept. Goodbye!",
                                   kind="info")
    clear_session_cookie(response, settings)
    return response


# --- export my data ----------------------------------------------------------------------------------


@router.post("/account/exports", dependencies=[Depends(require_csrf)])
def request_export(request: Request, session: SessionDep, settings: SettingsDep, user: PageUser) -> Response:
    try:
        export.request_export(session, settings, user)
    except export.ExportBusy as busy:
        return redirect_with_flash(request, "/account", str(busy), kind="info")
    return redirect_with_flash(request, "/account", "Your data export is being prepared: we email you a link "
                               "when it is ready, and it shows here.")


@router.get("/account/exports/{export_id:uuid}", name="export_download")
def download_export(export_id: uuid.UUID, session: SessionDep, settings: SettingsDep, storage: StorageDep,
                    user: PageUser) -> Response:
    """The owner's ready export, until it expires (404 after: the link in the email has expired)."""
    download = export.ready_download(session, user.id, export_id)
    if download is None:
        raise HTTPException(status_code=404, detail="No such export, or its link has expired.")
    key, filename = download
    return file_response(storage, settings, key, "application/zip", filename, "attachment", cache_control="no-store")

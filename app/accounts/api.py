"""Accounts JSON API: sign up, exchange a password for a bearer token, who am I, manage tokens, confirm
the address, reset a forgotten password, notifications, and delete the account."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session
from starlette.responses import Response

from app import rate_limits
from app.accounts import email_flows, export, repository, service, throttle
from app.accounts.deletion import delete_account
from app.accounts.schemas import (
    DetailOut,
    ExportOut,
    ForgotPasswordIn,
    NewTokenOut,
    PasswordIn,
    PasswordResetOut,
    ResetPasswordIn,
    SignedOutOut,
    SignupIn,
    TokenNameIn,
    TokenOut,
    TokenRequestIn,
    UserOut,
    UserUpdateIn,
    VerifyEmailIn,
)
from app.deps import ApiUser, PasswordHashSlot, SessionDep, SettingsDep, StorageDep, require_csrf
from app.galleries.files import file_response
from app.models import DataExport, User

router = APIRouter(prefix="/api/v1", tags=["accounts"])


def _new_token_out(created: service.NewApiToken) -> NewTokenOut:
    return NewTokenOut(
        id=created.api_token.id, name=created.api_token.name, created_at=created.api_token.created_at,
        last_used_at=created.api_token.last_used_at, token=created.token,
    )


def _new_token(session: Session, user: User, name: str) -> NewTokenOut:
    """A new token for ``user``, shown once; 400 naming a bad name."""
    try:
        created = service.create_api_token(session, user, name)
    except service.AccountError as error:
        session.rollback()
        raise HTTPException(status_code=400, detail=error.message) from error
    return _new_token_out(created)


@router.post("/auth/signup", status_code=status.HTTP_201_CREATED, response_model=UserOut,
             dependencies=[PasswordHashSlot])
def api_signup(body: SignupIn, request: Request, session: SessionDep, settings: SettingsDep) -> UserOut:
    """Create an account. 400 names a bad email or password; 409 when the email is taken; 403 when
    the operator closed sign-ups; 429 (with Retry-After) when the address made too many accounts this
    hour; 503 (with Retry-After) when the server is busy hashing other passwords."""
    try:
        service.check_signups_open(settings)
        user = service.sign_up_counted(session, body.email, body.password, throttle.sign_up_counter(request, settings))
    except service.SignupsClosed as error:
        raise HTTPException(status_code=403, detail=error.message) from error
    except service.TooManySignups as error:
        raise HTTPException(status_code=429, detail=error.message,
                            headers={"Retry-After": str(error.retry_after)}) from error
    except service.EmailTaken as error:
        session.rollback()
        raise HTTPException(status_code=409, detail=error.message) from error
    except service.AccountError as error:
        session.rollback()
        raise HTTPException(status_code=400, detail=error.message) from error
    email_flows.send_verification(session, settings, user)
    return UserOut.model_validate(user)


@router.post("/auth/token", status_code=status.HTTP_201_CREATED, response_model=NewTokenOut,
             dependencies=[PasswordHashSlot])
def api_token(body: TokenRequestIn, request: Request, session: SessionDep) -> Response | NewTokenOut:
    """Exchange an email and password for a new bearer token (shown once). Failed attempts are rate limited."""
    counters = throttle.sign_in_counters(request, body.email)
    retry_after = rate_limits.retry_after(session, counters)
    if retry_after is not None:
        return JSONResponse(
            {"detail": f"Too many failed attempts. Try again in {rate_limits.wait_in_words(retry_after)}."},
            status_code=429, headers={"Retry-After": str(retry_after)},
        )
    user = service.authenticate(session, body.email, body.password)
    if user is None:
        # Counted in a transaction of its own: this 401 rolls the request's transaction back.
        rate_limits.record_apart(request.app.state.sessionmaker, counters)
        raise HTTPException(status_code=401, detail=service.LOGIN_FAILED_MESSAGE)
    rate_limits.reset(session, counters[:1])  # this address starts afresh; the account's count stays
    return _new_token(session, user, body.name)


@router.get("/me", response_model=UserOut)
def me(user: ApiUser) -> UserOut:
    return UserOut.model_validate(user)


@router.get("/tokens", response_model=list[TokenOut])
def list_tokens(user: ApiUser, session: SessionDep) -> list[TokenOut]:
    """The caller's tokens that still work, newest first (never the tokens themselves)."""
    return [TokenOut.model_validate(token) for token in repository.active_tokens(session, user.id)]


@router.post(
    "/tokens", status_code=status.HTTP_201_CREATED, response_model=NewTokenOut, dependencies=[Depends(require_csrf)]
)
def create_token(body: TokenNameIn, user: ApiUser, session: SessionDep) -> NewTokenOut:
    return _new_token(session, user, body.name)


@router.delete(
    "/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[Depends(require_csrf)]
)
def revoke_token(token_id: uuid.UUID, user: ApiUser, session: SessionDep) -> Response:
    """Revoke one of the caller's tokens; another account's token (or an unknown id) is 404."""
    if not service.revoke_api_token(session, user, token_id):
        raise HTTPException(status_code=404, detail="No such token.")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/auth/sign-out-everywhere", response_model=SignedOutOut, dependencies=[Depends(require_csrf)])
def sign_out_everywhere(user: ApiUser, session: SessionDep) -> SignedOutOut:
    """Revoke every browser session and every API token of the caller, the one of this request too.

    For when someone else may have had the account: a changed password alone leaves tokens working.
    """
    ended = service.sign_out_everywhere(session, user)
    return SignedOutOut(sessions_ended=ended.sessions, tokens_revoked=ended.tokens)


def _too_many(retry_after: int, what: str) -> JSONResponse:
    return JSONResponse({"detail": f"Too many {what}. Try again in {rate_limits.wait_in_words(retry_after)}."},
                        status_code=429, headers={"Retry-After": str(retry_after)})


@router.patch("/me", response_model=UserOut, dependencies=[Depends(require_csrf)])
def update_me(body: UserUpdateIn, user: ApiUser, session: SessionDep) -> UserOut:
    """Change the caller's preferences: ``notify_by_email`` turns the studio emails on or off."""
    if body.notify_by_email is not None:
        user.notify_by_email = body.notify_by_email
        session.flush()
    return UserOut.model_validate(user)


@router.post("/auth/verify-email", response_model=UserOut)
def api_verify_email(body: VerifyEmailIn, session: SessionDep, settings: SettingsDep) -> UserOut:
    """Confirm an address with the token of the emailed link (no sign-in needed: the token names the
    account). 400 says why a token is refused: not valid, expired, or already used."""
    try:
        user = email_flows.verify_email(session, settings, body.token)
    except email_flows.LinkError as error:
        session.rollback()
        raise HTTPException(status_code=400, detail=error.message) from error
    return UserOut.model_validate(user)


@router.post("/auth/verify-email/resend", status_code=status.HTTP_202_ACCEPTED, response_model=DetailOut,
             dependencies=[Depends(require_csrf)])
def api_resend_verification(user: ApiUser, session: SessionDep, settings: SettingsDep) -> Response | DetailOut:
    """Send the caller a new confirmation link (409 when the address is confirmed already; 429 after three an hour)."""
    if user.email_verified_at is not None:
        raise HTTPException(status_code=409, detail="Your address is already confirmed.")
    counters = [(throttle.VERIFY_RESEND, str(user.id))]
    retry_after = rate_limits.retry_after(session, counters)
    if retry_after is not None:
        return _too_many(retry_after, "confirmation links were asked for")
    rate_limits.record(session, counters)
    email_flows.send_verification(session, settings, user)
    return DetailOut(detail=f"A new link is on its way to {user.email}.")


@router.post("/auth/password/forgot", status_code=status.HTTP_202_ACCEPTED, response_model=DetailOut)
def api_forgot_password(body: ForgotPasswordIn, request: Request, session: SessionDep,
                        settings: SettingsDep) -> Response | DetailOut:
    """Email a password-reset link to the account with this address. The answer is the same whether
    or not such an account exists; 429 (with Retry-After) after too many requests from one address
    or for one email."""
    counters = throttle.reset_counters(request, body.email)
    retry_after = rate_limits.retry_after(session, counters)
    if retry_after is not None:
        return _too_many(retry_after, "reset requests")
    rate_limits.record(session, counters)
    email_flows.request_password_reset(session, settings, body.email)
    return DetailOut(detail=email_flows.RESET_REQUESTED_MESSAGE)


@router.post("/auth/password/reset", response_model=PasswordResetOut, dependencies=[PasswordHashSlot])
def api_reset_password(body: ResetPasswordIn, session: SessionDep, settings: SettingsDep) -> PasswordResetOut:
    """Set a new password with the token of a reset link. Every browser session and API token of the
    account stops working. 400 names the problem: the link (not valid, expired, already used) or the
    password (then the link still works)."""
    try:
        _user, ended = email_flows.reset_password(session, settings, body.token, body.password)
    except service.AccountError as error:
        session.rollback()
        raise HTTPException(status_code=400, detail=error.message) from error
    return PasswordResetOut(detail="Your password is changed. Sign in with it again.",
                            sessions_ended=ended.sessions, tokens_revoked=ended.tokens)


@router.post("/me/delete", status_code=status.HTTP_204_NO_CONTENT, dependencies=[PasswordHashSlot,
                                                                              Depends(require_csrf)])
def api_delete_me(body: PasswordIn, request: Request, user: ApiUser, session: SessionDep, settings: SettingsDep,
                  storage: StorageDep) -> Response:
    """Delete the caller's account and everything of it (studios, photos, models, pictures, exports,
    tokens, sessions), stopping running trainings first; a last email confirms it. The password is
    asked again: 403 when it is wrong (counted: 429 after too many)."""
    counters = [(throttle.PASSWORD_CHANGE, str(user.id))]
    retry_after = rate_limits.retry_after(session, counters)
    if retry_after is not None:
        return _too_many(retry_after, "wrong passwords")
    if not service.password_matches(user, body.password):
        # This request's transaction may hold SQLite's write lock (a token's last_used_at): end it first.
        session.rollback()
        rate_limits.record_apart(request.app.state.sessionmaker, counters)
        raise HTTPException(status_code=403, detail="The password is wrong: the account is not deleted.")
    delete_account(session, storage, settings, user)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _export_out(found: DataExport) -> ExportOut:
    ready = found.status == "ready"
    return ExportOut(id=found.id, status=found.status, created_at=found.created_at, expires_at=found.expires_at,
                     download_url=f"/api/v1/me/exports/{found.id}/download" if ready else None)


@router.post("/me/exports", status_code=status.HTTP_202_ACCEPTED, response_model=ExportOut,
             dependencies=[Depends(require_csrf)])
def api_request_export(user: ApiUser, session: SessionDep, settings: SettingsDep) -> ExportOut:
    """Start building a ZIP of the caller's data (account, studios, kept photos, pictures); an email
    says when it is ready. 409 while another export is being built."""
    try:
        created = export.request_export(session, settings, user)
    except export.ExportBusy as busy:
        raise HTTPException(status_code=409, detail=str(busy)) from None
    return _export_out(created)


@router.get("/me/exports", response_model=list[ExportOut])
def api_list_exports(user: ApiUser, session: SessionDep) -> list[ExportOut]:
    """The caller's exports that have not expired, newest first."""
    return [_export_out(found) for found in export.exports_of(session, user.id)]


@router.get("/me/exports/{export_id}", response_model=ExportOut)
def api_get_export(export_id: uuid.UUID, user: ApiUser, session: SessionDep) -> ExportOut:
    found = export.live_export(session, user.id, export_id)
    if found is None:
        raise HTTPException(status_code=404, detail="No such export, or it has expired.")
    return _export_out(found)


@router.get("/me/exports/{export_id}/download", response_class=Response)
def api_download_export(export_id: uuid.UUID, user: ApiUser, session: SessionDep, settings: SettingsDep,
                        storage: StorageDep) -> Response:
    """The ZIP: streamed, or a redirect to a short-lived signed URL. 404 before it is ready and once expired."""
    download = export.ready_download(session, user.id, export_id)
    if download is None:
        raise HTTPException(status_code=404, detail="No such export, or it is not ready, or it has expired.")
    key, filename = download
    return file_response(storage, settings, key, "application/zip", filename, "attachment", cache_control="no-store")

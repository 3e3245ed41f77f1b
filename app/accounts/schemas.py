"""JSON shapes of the accounts API."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from app.accounts.service import MAX_EMAIL_LENGTH, MAX_TOKEN_NAME_LENGTH
from app.security import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH


class SignupIn(BaseModel):
    """The rules are checked by the accounts service, which answers 400 naming the one broken; the
    schema states them too (``json_schema_extra``) without making them a 422 list of errors."""

    email: str = Field(max_length=MAX_EMAIL_LENGTH, examples=["ann@example.com"],
                       json_schema_extra={"format": "email"})
    password: str = Field(max_length=MAX_PASSWORD_LENGTH, description=f"At least {MIN_PASSWORD_LENGTH} characters.",
                          json_schema_extra={"minLength": MIN_PASSWORD_LENGTH})


class TokenRequestIn(BaseModel):
    """Email and password exchanged for a new bearer token."""

    email: str = Field(max_length=320)
    password: str = Field(max_length=1024)
    name: str = Field(default="API token", max_length=100, description="A label to recognise the token by.")


class TokenNameIn(BaseModel):
    name: str = Field(max_length=MAX_TOKEN_NAME_LENGTH, examples=["laptop script"],
                      description="A label to recognise the token by; not only spaces.",
                      json_schema_extra={"pattern": r"\S"})


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    created_at: datetime
    email_verified_at: datetime | None = Field(
        description="When the address was confirmed with the emailed link; null until then.")
    notify_by_email: bool = Field(description="Whether \"your studio is ready / failed\" emails are sent.")


class UserUpdateIn(BaseModel):
    notify_by_email: StrictBool | None = Field(default=None, description="Turn the studio emails on or off.")


class VerifyEmailIn(BaseModel):
    token: str = Field(max_length=1000, description="The token of the link in the confirmation email.")


class ForgotPasswordIn(BaseModel):
    email: str = Field(max_length=MAX_EMAIL_LENGTH, examples=["ann@example.com"])


class ResetPasswordIn(BaseModel):
    token: str = Field(max_length=200, description="The token of the link in the reset email.")
    password: str = Field(max_length=MAX_PASSWORD_LENGTH, description=f"At least {MIN_PASSWORD_LENGTH} characters.",
                          json_schema_extra={"minLength": MIN_PASSWORD_LENGTH})


class PasswordIn(BaseModel):
    password: str = Field(max_length=MAX_PASSWORD_LENGTH, description="The account's current password.")


class DetailOut(BaseModel):
    detail: str


class TokenOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    created_at: datetime
    last_used_at: datetime | None


class NewTokenOut(TokenOut):
    token: str = Field(description="The bearer token. Shown only this once: store it now.")


class SignedOutOut(BaseModel):
    """What "sign out everywhere" ended: every browser session and every API token of the account."""

    sessions_ended: int
    tokens_revoked: int


class PasswordResetOut(SignedOutOut):
    """A password set with a reset link: every session and token of the account ended with it."""

    detail: str


class ExportOut(BaseModel):
    """An "export my data" ZIP: ``building``, then ``ready`` with ``download_url`` until ``expires_at``."""

    id: uuid.UUID
    status: str = Field(description="building, ready or failed")
    created_at: datetime
    expires_at: datetime
    download_url: str | None = Field(description="Where the ZIP is downloaded (with the same credentials) once ready.")

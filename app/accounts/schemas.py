"""JSON shapes of the accounts API."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class SignupIn(BaseModel):
    email: str = Field(max_length=320, examples=["ann@example.com"])
    password: str = Field(max_length=1024, description="At least 10 characters.")


class TokenRequestIn(BaseModel):
    """Email and password exchanged for a new bearer token."""

    email: str = Field(max_length=320)
    password: str = Field(max_length=1024)
    name: str = Field(default="API token", max_length=100, description="A label to recognise the token by.")


class TokenNameIn(BaseModel):
    name: str = Field(max_length=100, examples=["laptop script"])


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    email: str
    created_at: datetime


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

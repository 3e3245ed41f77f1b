"""Accounts and how they authenticate: server-side sessions and API tokens."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, TimestampMixin


class User(IdMixin, TimestampMixin, Base):
    __tablename__ = "users"

    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_active: Mapped[bool] = mapped_column(default=True)
    # The operator console (app/operator): set with `studio createuser --operator` or `studio grant-operator`.
    is_operator: Mapped[bool] = mapped_column(default=False)
    # Per-account monthly quotas an operator sets on the console; None: no quota.
    studios_per_month: Mapped[int | None] = mapped_column(default=None)
    gpu_minutes_per_month: Mapped[int | None] = mapped_column(default=None)


class UserSession(IdMixin, TimestampMixin, Base):
    """A browser login. Only the token's SHA-256 is stored; logout sets ``revoked_at``."""

    __tablename__ = "user_sessions"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class ApiToken(IdMixin, TimestampMixin, Base):
    """A bearer token for the JSON API. Only its SHA-256 is stored; shown once at creation."""

    __tablename__ = "api_tokens"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class RateEvent(IdMixin, Base):
    """One counted event of a rate limit (app.rate_limits): a failed sign-in, a studio created.

    ``key`` names the counter ("client:<hash>", "account:<hash>", "studios:<hash>"): what it counts
    is hashed, so the table keeps no one's address or typed email. Rows leave after two hours.
    """

    __tablename__ = "rate_events"
    __table_args__ = (Index("ix_rate_events_key_happened_at", "key", "happened_at"),)

    key: Mapped[str] = mapped_column(String(80))
    happened_at: Mapped[datetime] = mapped_column(index=True)

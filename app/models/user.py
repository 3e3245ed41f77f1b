"""Accounts and how they authenticate: server-side sessions and API tokens."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, Text, true
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, TimestampMixin


class User(IdMixin, TimestampMixin, Base):
    __tablename__ = "users"

    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_active: Mapped[bool] = mapped_column(default=True)
    # Set when the owner followed the link sent at sign-up (app.accounts.email_flows).
    email_verified_at: Mapped[datetime | None] = mapped_column(default=None)
    # "Your studio is ready / failed" emails; the account page turns them off.
    notify_by_email: Mapped[bool] = mapped_column(default=True, server_default=true())
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


class PasswordReset(IdMixin, TimestampMixin, Base):
    """A password-reset link sent by email. Only the token's SHA-256 is stored; ``used_at`` makes it single-use."""

    __tablename__ = "password_resets"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None] = mapped_column(default=None)


class OutgoingEmail(IdMixin, TimestampMixin, Base):
    """A rendered message waiting for the ``mail.send`` task (the outbox); deleted once it is sent.

    It names no account on purpose: the last email of a deleted account must outlive the account,
    and a sent message leaves no row behind. The broker only ever carries this row's id.
    """

    __tablename__ = "outgoing_emails"

    to_address: Mapped[str] = mapped_column(String(320), index=True)
    subject: Mapped[str] = mapped_column(String(300))
    text_body: Mapped[str] = mapped_column(Text)
    html_body: Mapped[str] = mapped_column(Text)


class DataExport(IdMixin, TimestampMixin, Base):
    """An "export my data" ZIP: built by a cpu task, offered until ``expires_at``, then removed.

    ``status`` is building, ready or failed; ``storage_key`` is set once the ZIP is stored.
    """

    __tablename__ = "data_exports"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="building")
    storage_key: Mapped[str | None] = mapped_column(String(500), default=None)
    expires_at: Mapped[datetime]

"""Account queries. Token queries are scoped to their owner in the query itself."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ApiToken, User, UserSession, utcnow


def user_by_email(session: Session, email: str) -> User | None:
    return session.scalars(select(User).where(User.email == email)).first()


def active_tokens(session: Session, owner_id: uuid.UUID) -> list[ApiToken]:
    """The owner's tokens that still work, newest first."""
    query = (
        select(ApiToken)
        .where(ApiToken.user_id == owner_id, ApiToken.revoked_at.is_(None))
        .order_by(ApiToken.created_at.desc())
    )
    return list(session.scalars(query))


def active_token(session: Session, owner_id: uuid.UUID, token_id: uuid.UUID) -> ApiToken | None:
    """One of the owner's live tokens; another account's id, or a revoked token, is None."""
    query = select(ApiToken).where(
        ApiToken.id == token_id, ApiToken.user_id == owner_id, ApiToken.revoked_at.is_(None)
    )
    return session.scalars(query).first()


def live_sessions(session: Session, owner_id: uuid.UUID) -> list[UserSession]:
    """The owner's browser sessions that still work (not revoked, not expired), newest first."""
    query = (
        select(UserSession)
        .where(UserSession.user_id == owner_id, UserSession.revoked_at.is_(None), UserSession.expires_at > utcnow())
        .order_by(UserSession.created_at.desc())
    )
    return list(session.scalars(query))

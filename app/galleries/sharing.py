"""Share links: private by default, revocable, expiring.

Nothing of a studio is visible to anyone else until its owner makes a link, of one picture or of the
whole gallery, for 1, 7 or 30 days. The link's URL is ``/s/<token>``, the token the row's id signed
with the site's secret (so the database holds no secret of it, and the owner can copy the link again
later). A link shows its pictures while its row exists, is not revoked and has not expired; a
revoked, expired, forged or deleted link answers 404 like any unknown address. Deleting the picture
or the studio deletes its links.

Services flush, never commit: the request's session dependency owns the transaction.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import GeneratedImage, ShareLink, Subject, utcnow

# How long a link may live, in days; the form's choices, the shortest first.
SHARE_DAYS = (1, 7, 30)
DEFAULT_SHARE_DAYS = 7
SHARE_PATH = "/s/"


class ShareRefused(ValueError):
    """A link that cannot be made; the message is a sentence for the person."""


def _signer(settings: Settings) -> URLSafeSerializer:
    return URLSafeSerializer(settings.secret_key, salt="studio-share-link")


def share_token(settings: Settings, link: ShareLink) -> str:
    return str(_signer(settings).dumps(str(link.id)))


def share_url(settings: Settings, link: ShareLink) -> str:
    """The link's path on this site: "/s/<token>"."""
    return SHARE_PATH + share_token(settings, link)


def create_share(session: Session, subject: Subject, image: GeneratedImage | None, days: int,
                 now: datetime | None = None) -> ShareLink:
    """A new link of ``image`` (one of ``subject``'s) or, with None, of the whole gallery; flushed."""
    if days not in SHARE_DAYS:
        raise ShareRefused(f"A link lasts {', '.join(str(d) for d in SHARE_DAYS[:-1])} or {SHARE_DAYS[-1]} days.")
    if image is not None and image.subject_id != subject.id:
        raise ShareRefused("That picture is not in this studio.")
    link = ShareLink(owner_id=subject.owner_id, subject_id=subject.id, image_id=image.id if image else None,
                     expires_at=(now or utcnow()) + timedelta(days=days))
    session.add(link)
    session.flush()
    return link


def is_live(link: ShareLink, now: datetime | None = None) -> bool:
    return link.revoked_at is None and link.expires_at > (now or utcnow())


def links_of(session: Session, subject_id: uuid.UUID, owner_id: uuid.UUID, live_only: bool = True,
             now: datetime | None = None) -> list[ShareLink]:
    """The owner's links of a studio, newest first; by default only those that still show something."""
    query = (select(ShareLink)
             .where(ShareLink.subject_id == subject_id, ShareLink.owner_id == owner_id)
             .order_by(ShareLink.created_at.desc(), ShareLink.id))
    links = list(session.scalars(query))
    return [link for link in links if is_live(link, now)] if live_only else links


def get_owned(session: Session, link_id: uuid.UUID, owner_id: uuid.UUID) -> ShareLink | None:
    return session.scalars(
        select(ShareLink).where(ShareLink.id == link_id, ShareLink.owner_id == owner_id)
    ).one_or_none()


def revoke(session: Session, link: ShareLink, now: datetime | None = None) -> None:
    """Turn the link off for good (flushed); revoking twice changes nothing."""
    if link.revoked_at is None:
        link.revoked_at = now or utcnow()
        session.flush()


def open_share(session: Session, settings: Settings, token: str,
               now: datetime | None = None) -> tuple[ShareLink, Subject] | None:
    """The live link behind ``token`` and its studio, or None (forged, revoked, expired or deleted)."""
    try:
        link_id = uuid.UUID(str(_signer(settings).loads(token)))
    except (BadSignature, ValueError):
        return None
    link = session.get(ShareLink, link_id)
    if link is None or not is_live(link, now):
        return None
    subject = session.get(Subject, link.subject_id)
    return None if subject is None else (link, subject)


def shared_images(session: Session, link: ShareLink) -> list[GeneratedImage]:
    """What the link shows: its one picture, or every picture of the studio, oldest first."""
    query = select(GeneratedImage).where(GeneratedImage.subject_id == link.subject_id)
    if link.image_id is not None:
        query = query.where(GeneratedImage.id == link.image_id)
    return list(session.scalars(query.order_by(GeneratedImage.created_at, GeneratedImage.seed, GeneratedImage.id)))


def delete_links_of_image(session: Session, image_id: uuid.UUID) -> None:
    """A deleted picture's links go with it (SQLite does not cascade)."""
    session.execute(delete(ShareLink).where(ShareLink.image_id == image_id))

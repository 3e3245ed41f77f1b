"""Share links: a picture or a whole album, shown to whoever has the link until it expires or is revoked."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, IdMixin, TimestampMixin


class ShareLink(IdMixin, TimestampMixin, Base):
    """One link the owner made: of ``image_id``, or of the whole studio's gallery when that is None.

    Nothing is shared until the owner makes a link (private by default). The link's URL carries a
    token signed with the site's secret (app.galleries.sharing), so only the row's id is stored; a
    revoked or expired link, or one whose studio or picture is gone, shows nothing.
    """

    __tablename__ = "share_links"

    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    subject_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("generated_images.id", ondelete="CASCADE"), index=True, default=None
    )
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

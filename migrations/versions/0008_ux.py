"""Share links: a picture or a studio's gallery, shown to whoever has the link until it expires or is revoked.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "share_links",
        sa.Column("owner_id", sa.Uuid(), nullable=False),
        sa.Column("subject_id", sa.Uuid(), nullable=False),
        sa.Column("image_id", sa.Uuid(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["image_id"], ["generated_images.id"], name=op.f("fk_share_links_image_id_generated_images"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], name=op.f("fk_share_links_owner_id_users"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["subject_id"], ["subjects.id"], name=op.f("fk_share_links_subject_id_subjects"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_share_links")),
    )
    op.create_index(op.f("ix_share_links_image_id"), "share_links", ["image_id"])
    op.create_index(op.f("ix_share_links_owner_id"), "share_links", ["owner_id"])
    op.create_index(op.f("ix_share_links_subject_id"), "share_links", ["subject_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_share_links_subject_id"), table_name="share_links")
    op.drop_index(op.f("ix_share_links_owner_id"), table_name="share_links")
    op.drop_index(op.f("ix_share_links_image_id"), table_name="share_links")
    op.drop_table("share_links")

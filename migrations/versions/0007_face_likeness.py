"""Generated images: the face match of a person's pictures (mean descriptor distance to the uploads).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("generated_images") as batch:
        batch.add_column(sa.Column("face_distance", sa.Double(), nullable=True))
        batch.add_column(sa.Column("face_checked", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("generated_images") as batch:
        batch.drop_column("face_checked")
        batch.drop_column("face_distance")

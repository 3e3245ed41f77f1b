"""Jobs: who holds the lease (host:pid), and an index for the queue position in send order.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_holder", sa.String(length=255), nullable=True))
    op.create_index("ix_jobs_status_enqueued_at", "jobs", ["status", "enqueued_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_jobs_status_enqueued_at", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_holder")

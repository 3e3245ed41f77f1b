"""Rate-limit events (failed sign-ins, studios created) that every web process counts together.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rate_events",
        sa.Column("key", sa.String(length=80), nullable=False),
        sa.Column("happened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rate_events")),
    )
    op.create_index("ix_rate_events_key_happened_at", "rate_events", ["key", "happened_at"], unique=False)
    op.create_index(op.f("ix_rate_events_happened_at"), "rate_events", ["happened_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_rate_events_happened_at"), table_name="rate_events")
    op.drop_index("ix_rate_events_key_happened_at", table_name="rate_events")
    op.drop_table("rate_events")

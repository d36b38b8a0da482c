"""Key rotation: a publisher key names the key it was rotated to.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("publishers", sa.Column("rotated_to", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("publishers") as batch:
        batch.drop_column("rotated_to")

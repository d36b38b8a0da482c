"""Privacy ledger: each adapter records the DP epsilon and delta spent on its centroid.

A publisher's spend is the sum over its adapters (and those of the keys in its rotation chain).
Adapters stored before this revision get NULL, which the ledger counts as nothing spent: their
manifests are not read back here (the blobs live outside the database).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("adapters", sa.Column("privacy_epsilon", sa.Float(), nullable=True))
    op.add_column("adapters", sa.Column("privacy_delta", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("privacy_delta")
        batch.drop_column("privacy_epsilon")

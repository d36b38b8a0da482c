"""Adapter spread: each adapter row keeps its manifest's signed spread (schema 2) for retrieval.

The quantiles (q50, q90, q99) of the training embeddings' distances to their nearest centroid,
as canonical JSON text; NULL for version-1 manifests (which carry none: retrieval uses the
library's default for them) and for every adapter stored before this revision (all version 1).

Revision ID: 0005
Revises: 0004
Create Date: 2027-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("adapters", sa.Column("spread", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("spread")

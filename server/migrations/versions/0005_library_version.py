"""Library version counter: one row raised in every transaction that changes the index.

Before this revision the index version was computed on every request from five count queries
(highest adapter id, revoked versions, keys, revoked keys, rotated keys: each change raised one
of them by one). The new row is seeded with exactly that value, so a node that has seen
version V of a running registry never sees a lower one after the upgrade; from then on each
change raises the row by one in the change's own transaction.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-10 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Today's value of the version the counter replaces (same SQL on SQLite and PostgreSQL).
_SEED = """
INSERT INTO library_version (id, version) SELECT 1,
    (SELECT COALESCE(MAX(id), 0) FROM adapters)
  + (SELECT COUNT(*) FROM adapters WHERE revoked_at IS NOT NULL)
  + (SELECT COUNT(*) FROM publishers)
  + (SELECT COUNT(*) FROM publishers WHERE NOT active)
  + (SELECT COUNT(*) FROM publishers WHERE rotated_to IS NOT NULL)
"""


def upgrade() -> None:
    op.create_table(
        "library_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute(_SEED)


def downgrade() -> None:
    op.drop_table("library_version")

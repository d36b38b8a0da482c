"""Change stamps: each adapter row records the library version that last changed its name.

Publishing or revoking a version stamps that version's row, and revoking a key stamps every
row it signed, each with the library version of that transaction.
The registry's retrieval table then reads the names changed since its own version (an index
range) and updates only those, where it used to read and parse the whole library after every
change. Existing rows keep NULL: a registry process builds its table whole when it starts.

Revision ID: 0008
Revises: 0007
Create Date: 2027-01-03 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("adapters", sa.Column("changed_in", sa.BigInteger(), nullable=True))
    op.create_index("ix_adapters_changed_in", "adapters", ["changed_in"])


def downgrade() -> None:
    op.drop_index("ix_adapters_changed_in", table_name="adapters")
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("changed_in")

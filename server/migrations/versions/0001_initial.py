"""Initial schema: publishers, adapters, adapter_files.

Exactly the tables of ``semla.server.db`` as first released (what ``Base.metadata.create_all``
built before migrations existed; ``semla-server db upgrade`` stamps such a database with this
revision instead of creating the tables again).

Revision ID: 0001
Revises:
Create Date: 2026-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "publishers",
        sa.Column("key_id", sa.String(length=16), nullable=False),
        sa.Column("public_key", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=128), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key_id"),
        sa.UniqueConstraint("public_key"),
    )
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("publisher_key_id", sa.String(length=16), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("base_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("domain", sa.Text(), nullable=False),
        sa.Column("sample_count", sa.BigInteger(), nullable=False),
        sa.Column("centroids", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["publisher_key_id"], ["publishers.key_id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "version", name="uq_adapters_name_version"),
    )
    op.create_index("ix_adapters_name", "adapters", ["name"], unique=False)
    op.create_index("ix_adapters_publisher_key_id", "adapters", ["publisher_key_id"], unique=False)
    op.create_table(
        "adapter_files",
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("filename", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("adapter_id", "filename"),
    )
    op.create_index("ix_adapter_files_sha256", "adapter_files", ["sha256"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_adapter_files_sha256", table_name="adapter_files")
    op.drop_table("adapter_files")
    op.drop_index("ix_adapters_publisher_key_id", table_name="adapters")
    op.drop_index("ix_adapters_name", table_name="adapters")
    op.drop_table("adapters")
    op.drop_table("publishers")

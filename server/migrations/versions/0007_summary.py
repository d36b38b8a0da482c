"""Adapter summary: each adapter row keeps its listing entry as JSON text, composed when written.

A listing page (``GET /v1/adapters``, an adapter's versions) used to read every field of 100 rows
and compose their JSON on each request. Now the publish (and the revocation) composes it once,
into ``adapters.summary``, and a page joins 100 stored texts.

This revision fills the column for every existing row with the same composer the registry uses
(:func:`semla.server.service.library.compose_summary`), in batches of 5,000 rows by id. On
PostgreSQL the column is then made ``NOT NULL``; SQLite cannot add that constraint to an existing
column without rebuilding the table (a copy of every row), so there it stays nullable and the
registry always writes it.

Revision ID: 0007
Revises: 0006
Create Date: 2027-01-02 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 5_000

#: The columns the summary is composed from, typed (SQLite hands timestamps back as text).
_adapters = sa.table(
    "adapters",
    sa.column("id", sa.Integer()),
    sa.column("name", sa.String()),
    sa.column("version", sa.BigInteger()),
    sa.column("publisher_key_id", sa.String()),
    sa.column("manifest_sha256", sa.String()),
    sa.column("base_fingerprint", sa.String()),
    sa.column("domain", sa.Text()),
    sa.column("sample_count", sa.BigInteger()),
    sa.column("centroids", sa.Text()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("revoked_at", sa.DateTime(timezone=True)),
    sa.column("spread", sa.Text()),
    sa.column("summary", sa.Text()),
)


def upgrade() -> None:
    from semla.server.service.library import compose_summary

    op.add_column("adapters", sa.Column("summary", sa.Text(), nullable=True))
    conn = op.get_bind()
    fill = (sa.update(_adapters).where(_adapters.c.id == sa.bindparam("row_id"))
            .values(summary=sa.bindparam("row_summary")))
    after = -1
    while True:
        rows = conn.execute(sa.select(_adapters).where(_adapters.c.id > after)
                            .order_by(_adapters.c.id).limit(_BATCH)).all()
        if not rows:
            break
        conn.execute(fill, [{"row_id": row.id, "row_summary": compose_summary(row)} for row in rows])
        after = rows[-1].id
    if conn.dialect.name == "postgresql":
        op.alter_column("adapters", "summary", nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("summary")

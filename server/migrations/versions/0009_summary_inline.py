"""PostgreSQL keeps each adapter's listing entry (``adapters.summary``) in the row itself.

A row holds two long texts: its centroids (read when the server builds its retrieval table) and
its summary (read by every listing page). PostgreSQL moves the longest value of a row over about
2 kB out to the table's TOAST relation, and at 64-d centroids that was the summary, so each
listing page fetched its 100 texts one by one from there (measured at 100k adapters: 1.2-1.4 ms
of backend CPU a page, against 0.8-0.9 ms with the summaries in the rows). Storage ``MAIN``
tells PostgreSQL to move the other texts out first; a summary still leaves the row when the row
cannot hold it (centroids of CLIP's 512 or more dimensions make it too long for any page).

``SET STORAGE`` changes only how rows are written from now on, so this revision also rewrites
each stored summary, in batches of 5,000 rows by id (a value written again unchanged would keep
its place). SQLite stores rows whole (long ones continue on overflow pages) and has no such
setting: there this revision does nothing.

Revision ID: 0009
Revises: 0008
Create Date: 2027-01-04 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 5_000


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE adapters ALTER COLUMN summary SET STORAGE MAIN")
    rewrite = sa.text("UPDATE adapters SET summary = summary || '' WHERE id >= :first AND id < :first + :batch")
    last = conn.scalar(sa.text("SELECT max(id) FROM adapters"))
    for first in range(0, (last or 0) + 1, _BATCH):
        conn.execute(rewrite, {"first": first, "batch": _BATCH})


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE adapters ALTER COLUMN summary SET STORAGE EXTENDED")

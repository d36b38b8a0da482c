"""Alembic environment of the registry database, configured from code (no alembic.ini).

:func:`semla.server.db.alembic_config` builds the :class:`alembic.config.Config`; the caller
passes an open connection in ``config.attributes["connection"]`` (that is how
:func:`semla.server.db.upgrade` runs). A URL in ``sqlalchemy.url`` works too, so a developer
can make the next revision from the ORM models with::

    python -c "from alembic import command; from semla.server.db import alembic_config; \\
               command.revision(alembic_config('sqlite:///scratch.db'), 'what changed', autogenerate=True)"

(after ``semla-server db upgrade --database-url sqlite:///scratch.db``). Review what
autogenerate wrote: it does not see every change (renames, server defaults).
"""

from __future__ import annotations

from alembic import context

from semla.server.db import Base, make_engine, migration_connection

#: Any constant: PostgreSQL advisory lock that serialises concurrent ``db upgrade`` runs.
_PG_MIGRATION_LOCK = 0x53454D4C41  # "SEMLA"

config = context.config
target_metadata = Base.metadata


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things: later revisions use batch operations there.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Two replicas or operators upgrading at once: the second waits, then finds head.
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with migration_connection(engine) as conn:
            _configure(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

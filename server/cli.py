"""``semla-server``: run the registry with uvicorn; ``semla-server db upgrade``: migrate its database;
``semla-server bases add CARD.json`` / ``bases list``: the base models it accepts adapters for;
``semla-server sweep``: delete orphan blobs; ``semla-server tuf init|rotate-root|rebuild``: the
TUF metadata's root keys (offline files, k of n) and a full re-sign from the database.

Each command is one handler in :data:`COMMANDS` (name → function of the parsed arguments and
the settings).

Every flag defaults to its ``SEMLA_*`` environment variable (via :class:`ServerSettings`); a
flag given on the command line wins. Bad settings, an unreachable database or a database
whose schema revision is not this release's head end with one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from semla.server.db import SchemaError
from semla.server.settings import (
    DEFAULT_EPSILON_BUDGET,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_MIN_SAMPLES,
    ServerSettings,
)

__all__ = ["COMMANDS", "main", "build_parser"]

#: flag dest → (ServerSettings field, help text)
_FLAGS = {
    "data_dir": ("--data-dir", "PATH", "directory for the blob store and the default SQLite database "
                 "(env SEMLA_DATA_DIR, default ./semla-data)"),
    "host": ("--host", "HOST", "interface to listen on (env SEMLA_HOST, default 127.0.0.1)"),
    "port": ("--port", "PORT", "TCP port to listen on (env SEMLA_PORT, default 8080)"),
    "admin_token": ("--admin-token", "TOKEN", "bearer token for admin endpoints such as key registration "
                    "(env SEMLA_ADMIN_TOKEN; unset disables them). Prefer the env var: flags show up in ps"),
    "database_url": ("--database-url", "URL", "SQLAlchemy database URL, e.g. postgresql+psycopg://user@host/db "
                     "(env SEMLA_DATABASE_URL, default sqlite:///DATA_DIR/registry.db)"),
    "log_format": ("--log-format", "{text,json}", "text: uvicorn's log lines; json: one JSON object per line "
                   "(time, level, logger, message; access lines add client, method, path, status) "
                   "(env SEMLA_LOG_FORMAT, default text)"),
}


def _root_key_options(command: argparse.ArgumentParser, *keys: tuple[str, str, str]) -> None:
    """``--threshold``, ``--generate`` and one repeatable key-file option per (flag, dest, help)."""
    for flag, dest, text in keys:
        command.add_argument(flag, dest=dest, type=Path, action="append", required=True, metavar="KEY", help=text)
    command.add_argument("--threshold", type=int, default=1, metavar="K",
                         help="root keys (of the new set) that must sign each root (default 1)")
    command.add_argument("--generate", action="store_true",
                         help="create the new root key files that do not exist yet (with KEY.pub beside each); "
                         "only for the new keys")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semla-server",
        description="Run the SemLA adapter registry: verifies signed LoRA adapter bundles on upload "
        "and serves the index and files over HTTP (OpenAPI docs at /docs).",
        epilog=f"Also read from the environment: SEMLA_MAX_UPLOAD_BYTES (default {DEFAULT_MAX_UPLOAD_BYTES}); "
        f"SEMLA_MIN_SAMPLES, the fewest samples behind a centroid (default {DEFAULT_MIN_SAMPLES}); "
        f"SEMLA_EPSILON_BUDGET, the DP epsilon each publisher may spend on centroids (default "
        f"{DEFAULT_EPSILON_BUDGET:g}; empty or 'none' for no limit); SEMLA_MAX_JSON_BYTES, the largest JSON "
        "request body (default 1 MiB); SEMLA_BODY_IDLE_TIMEOUT_S, SEMLA_BODY_GRACE_S and SEMLA_BODY_MIN_RATE: a "
        "request body pausing longer than the first (default 10 s) or, after the grace (default 10 s), arriving "
        "slower than the rate (default 16384 bytes/s) is answered 408 and its connection closed. "
        "SEMLA_METRICS=false turns off /metrics (Prometheus). SEMLA_COMPUTE_THREADS: BLAS/OpenMP threads of the "
        "server process (default 1: concurrent requests are the parallelism). Access log on stdout, server log on "
        "stderr.",
    )
    for dest, (flag, metavar, text) in _FLAGS.items():
        parser.add_argument(flag, dest=dest, metavar=metavar, default=None, help=text)
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", title="commands", description="without a command, run the server"
    )
    db = commands.add_parser(
        "db", help="manage the database schema (Alembic migrations)",
        description="Manage the registry database's schema. The server refuses to start on a database "
        "whose revision is not this release's head; an empty SQLite database is set up automatically.",
    )
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = db_commands.add_parser(
        "upgrade", help="migrate the database to this release's schema (creates it in an empty database)",
        description="Migrate the database to this release's head schema revision: creates the tables in "
        "an empty database, adopts one made before migrations existed, no-op when already at head. "
        "Safe to run from several hosts at once on PostgreSQL.",
    )
    sweep = commands.add_parser(
        "sweep", help="delete blobs no adapter references and temp files a crash left behind",
        description="Delete blob files that no database row references (an upload that failed or was cut "
        "off by a crash) and leftover temp files. Only files older than --min-age go, so uploads in "
        "flight on any replica are safe.",
    )
    sweep.add_argument("--min-age", type=float, default=3600.0, metavar="SECONDS",
                       help="only delete files at least this old (default 3600)")
    tuf = commands.add_parser(
        "tuf", help="the TUF metadata nodes update through: root keys, root rotation, rebuild",
        description="The registry signs its library as TUF metadata (DATA_DIR/tuf). Root keys are files the "
        "operator keeps offline; k of n of them sign each root. Online keys (timestamp, snapshot, targets, "
        "bins) stay in DATA_DIR/tuf/keys. A registry started without `tuf init` creates a repository with one "
        "root key in DATA_DIR/tuf/root-keys: move it offline, or rotate to k-of-n keys with `tuf rotate-root`.",
    )
    tuf_commands = tuf.add_subparsers(dest="tuf_command", metavar="ACTION", required=True)
    tuf_init = tuf_commands.add_parser(
        "init", help="create the TUF repository with k-of-n root keys (before the first start)",
        description="Write version 1 of root, targets, snapshot, timestamp and the hashed bins, then sign the "
        "library already in the database. A registry key from before TUF (DATA_DIR/registry.key and the keys "
        "it was rotated from) also signs the first root, so nodes pinned to it accept it.",
    )
    _root_key_options(tuf_init, ("--root-key", "root_keys", "a root private key file (repeat for each of the n keys)"))
    rotate_root = tuf_commands.add_parser(
        "rotate-root", help="sign a new root with new root keys (the old threshold of old keys must sign)",
        description="Write root N+1 naming the new root keys and threshold, signed by the old root keys given "
        "and by K of the new ones. Nodes follow it at their next refresh and refuse one that the old "
        "threshold did not sign.",
    )
    _root_key_options(rotate_root,
                      ("--old-key", "old_keys", "a current root private key file (repeat up to its threshold)"),
                      ("--new-key", "new_keys", "a new root private key file (repeat for each of the n keys)"))
    tuf_rebuild = tuf_commands.add_parser(
        "rebuild", help="re-sign every bin, shard and the key list from the database",
        description="Recompute the TUF targets from the database and sign what differs (after a failed "
        "re-sign was logged, or a restore). Safe while replicas run: it takes the publish lock.",
    )
    bases = commands.add_parser(
        "bases", help="the base models adapters may be published for (base cards)",
        description="Every upload is checked against the card of the base model it names; an adapter for a "
        "base without a card is refused (unknown_base). Cards of the bundled bases ship with the package; "
        "compute others with `semla-node base-card --base ARCH --pretrained ... --out CARD.json` on a "
        "machine with torch. Added cards are kept in DATA_DIR/bases and apply to the next upload.",
    )
    bases_commands = bases.add_subparsers(dest="bases_command", metavar="ACTION", required=True)
    bases_add = bases_commands.add_parser("add", help="install a base card (JSON from semla-node base-card)",
                                          description="Validate a base card and install it (replacing an "
                                          "earlier card of the same fingerprint).")
    bases_add.add_argument("card", type=Path, metavar="CARD.json", help="the card file")
    bases_list = bases_commands.add_parser("list", help="list the known base cards",
                                           description="One line per card: arch, fingerprint, embedding, "
                                           "number of LoRA targets, bounds, bundled or added.")
    for command in (bases_add, bases_list, rotate_root):
        command.add_argument("--data-dir", dest="data_dir", metavar="PATH", default=argparse.SUPPRESS,
                             help=_FLAGS["data_dir"][2])
    for command in (up, sweep, tuf_init, tuf_rebuild):
        for dest in ("database_url", "data_dir"):
            flag, metavar, text = _FLAGS[dest]
            # SUPPRESS: a value given before the command (semla-server --data-dir X db upgrade) stays.
            command.add_argument(flag, dest=dest, metavar=metavar, default=argparse.SUPPRESS, help=text)
    return parser


def _fail(message: str) -> int:
    print(f"semla-server: error: {message}", file=sys.stderr)
    return 2


def _settings_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ())) or "settings"
    env = f"SEMLA_{field.upper()}"
    where = f"{_FLAGS[field][0]} / {env}" if field in _FLAGS else env
    return f"invalid {where}: {first.get('msg', 'invalid value')}"


def _db_upgrade(settings: ServerSettings) -> int:
    from sqlalchemy.engine import make_url

    from semla.server.db import current_revision, make_engine, upgrade

    try:
        engine = make_engine(settings.resolved_database_url)
        where = make_url(settings.resolved_database_url).render_as_string(hide_password=True)
    except (SQLAlchemyError, ImportError) as exc:
        return _fail(f"cannot open the database: {str(exc).splitlines()[0]}")
    try:
        before = current_revision(engine)
        head = upgrade(engine)
    except SchemaError as exc:
        return _fail(str(exc))
    except (SQLAlchemyError, ImportError) as exc:
        return _fail(f"cannot upgrade the database: {str(exc).splitlines()[0]}")
    finally:
        engine.dispose()
    if before == head:
        print(f"semla-server: {where} is already at schema revision {head} (head)")
    else:
        print(f"semla-server: upgraded {where} from schema revision {before or '(none)'} to {head} (head)")
    return 0


def _bases(args: argparse.Namespace, settings: ServerSettings) -> int:
    from semla.schemas.errors import SemlaError
    from semla.server.bases import BaseCardStore

    store = BaseCardStore(settings.base_cards_dir)
    if args.bases_command == "add":
        try:
            card = store.add(args.card.read_bytes())
        except OSError as exc:
            return _fail(f"cannot read {args.card}: {exc.strerror or exc}")
        except SemlaError as exc:
            return _fail(f"{args.card}: {exc.message}")
        print(f"added base card {card.arch} {card.fingerprint[:16]} ({len(card.targets)} LoRA targets, "
              f"embedding {card.embedding.name} dim {card.embedding.dim})")
        return 0
    for card, source in store.listing():
        b = card.bounds
        print(f"{card.arch}\t{card.fingerprint}\t{card.embedding.name}\tdim={card.embedding.dim}\t"
              f"targets={len(card.targets)}\tmax_rank={b.max_rank}\tmax_alpha={b.max_alpha:g}\t"
              f"max_relative_effect={b.max_relative_effect:g}\tmax_abs_value={b.max_abs_value:g}\t{source}")
    return 0


def _tuf_keys(paths: Sequence[Path], generate: bool) -> list:
    """The private keys at ``paths``; with ``generate``, the missing ones are created first."""
    from semla.registry import keys as _keys

    found = []
    for path in paths:
        if generate and not path.exists():
            _keys.save_keypair(_keys.generate_key(), path)
            print(f"created root key {path} (public key {path}.pub): keep it offline")
        found.append(_keys.load_private_key(path))
    return found


def _tuf(args: argparse.Namespace, settings: ServerSettings) -> int:
    from semla.schemas.errors import SemlaError
    from semla.server.tufrepo import TufRepository

    directory = settings.data_dir / "tuf"
    try:
        if args.tuf_command == "rotate-root":
            repo = TufRepository(directory, timestamp_ttl=settings.index_ttl_seconds)
            version = repo.rotate_root(_tuf_keys(args.old_keys, False), _tuf_keys(args.new_keys, args.generate),
                                       args.threshold)
            print(f"wrote root version {version} ({args.threshold} of {len(args.new_keys)} root keys); nodes "
                  "follow it at their next refresh")
            return 0
        if args.tuf_command == "init":
            from semla.server.tufsync import legacy_keys

            root_keys = _tuf_keys(args.root_keys, args.generate)
            legacy = legacy_keys(settings.resolved_registry_key_file)
            TufRepository.create(directory, root_keys, args.threshold, legacy_keys=legacy,
                                 timestamp_ttl=settings.index_ttl_seconds)
            print(f"created the TUF repository in {directory}: root signed by {args.threshold} of "
                  f"{len(root_keys)} root keys" + (f" and the {len(legacy)} registry key(s) nodes pinned before TUF"
                                                   if legacy else ""))
        version = _tuf_resign(settings, directory)
        print(f"signed the library from the database: snapshot version {version}")
        return 0
    except SemlaError as exc:
        return _fail(exc.message)
    except SchemaError as exc:
        return _fail(str(exc))
    except (SQLAlchemyError, ImportError) as exc:
        return _fail(f"cannot open the database: {str(exc).splitlines()[0]}")


def _tuf_resign(settings: ServerSettings, directory: Path) -> int:
    """Re-sign every bin from the database under the publish locks; the snapshot version now."""
    from semla.server.db import check_schema, make_engine, make_sessionmaker
    from semla.server.service.core import lock_publishing
    from semla.server.tufrepo import TufRepository
    from semla.server.tufsync import TufSync

    repo = TufRepository(directory, timestamp_ttl=settings.index_ttl_seconds)
    engine = make_engine(settings.resolved_database_url)
    try:
        check_schema(engine, upgrade_if_empty=engine.dialect.name == "sqlite")
        with make_sessionmaker(engine)() as session:
            lock_publishing(session)
            TufSync(repo).rebuild(session)
            session.commit()  # ends the transaction: releases the advisory lock
    finally:
        engine.dispose()
    return repo.snapshot_version()


def _serve_or_sweep(args: argparse.Namespace, settings: ServerSettings) -> int:
    import logging.config

    from semla.registry.logs import uvicorn_log_config
    from semla.server.app import create_app

    # Logging as the server will log from the start: setting up the app may log (a new TUF repository).
    logging.config.dictConfig(uvicorn_log_config(settings.log_format))
    try:
        app = create_app(settings)
    except SchemaError as exc:
        return _fail(str(exc))
    except (SQLAlchemyError, ImportError) as exc:
        return _fail(f"cannot open the database: {str(exc).splitlines()[0]}")
    except OSError as exc:
        return _fail(f"cannot prepare {settings.data_dir}: {exc.strerror or exc}")
    if args.command == "sweep":
        counts = app.state.service.sweep_orphans(min_age_s=args.min_age)
        print(f"deleted {counts['blobs']} orphan blob(s) and {counts['temp_files']} temp file(s); "
              f"kept {counts['kept_young']} younger than {args.min_age:g} s")
        return 0

    import uvicorn
    from threadpoolctl import threadpool_limits

    threadpool_limits(settings.compute_threads)  # for the process's lifetime (BLAS, FAISS's OpenMP)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=True,
                log_config=uvicorn_log_config(settings.log_format))
    return 0


#: command name (None: serve) → handler(args, settings) returning the exit status.
COMMANDS: dict[str | None, Callable[[argparse.Namespace, ServerSettings], int]] = {
    None: _serve_or_sweep,
    "sweep": _serve_or_sweep,
    "db": lambda args, settings: _db_upgrade(settings),
    "bases": _bases,
    "tuf": _tuf,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``semla-server``; returns the exit status."""
    args = build_parser().parse_args(argv)
    overrides = {dest: getattr(args, dest) for dest in _FLAGS if getattr(args, dest, None) is not None}
    try:
        settings = ServerSettings(**overrides)
    except ValidationError as exc:
        return _fail(_settings_error(exc))
    try:
        if args.command in (None, "tuf") or settings.database_url is None:  # db upgrade of a server database: no data dir
            settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _fail(f"cannot create data directory {settings.data_dir}: {exc.strerror}")
    return COMMANDS[args.command](args, settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

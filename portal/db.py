"""The database: engine from ``database_url`` (SQLite by default, PostgreSQL by URL), schema
migrations with Alembic, one session per request or per reconcile cycle."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlmodel import Session, create_engine

from portal.errors import ConfigError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: the SQLite database and its journal: password hashes, token hashes, every job's request and
#: environment. The portal and its daemons (one account: root on the portal host) are its only
#: readers, so the owner alone reads and writes it.
DB_FILE_MODE = 0o600
#: the files SQLite keeps beside the database (it gives them the database file's mode)
JOURNAL_SUFFIXES = ("-wal", "-shm", "-journal")


def make_engine(url: str, echo: bool = False) -> sa.Engine:
    """An engine for ``url``. SQLite gets WAL (readers do not block the writer), foreign keys
    and a busy timeout, so the portal's workers and the reconciler can share one file."""
    if url.startswith("sqlite"):
        if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:") and url != "sqlite://":
            parent = Path(url[len("sqlite:///"):]).parent
            if not parent.is_dir():
                raise ConfigError("database_url %s: folder %s does not exist (the portal role creates "
                                  "/var/lib/aiportal)" % (url, parent))
            private_sqlite_files(Path(url[len("sqlite:///"):]))
        kw: dict = {"connect_args": {"check_same_thread": False, "timeout": 30}}
        if url in ("sqlite://", "sqlite:///:memory:"):
            kw["poolclass"] = sa.pool.StaticPool   # one shared in-memory database (tests)
        engine = create_engine(url, echo=echo, **kw)

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            if url not in ("sqlite://", "sqlite:///:memory:"):
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
        return engine
    try:
        return create_engine(url, echo=echo, pool_pre_ping=True)
    except (sa.exc.ArgumentError, ModuleNotFoundError) as e:
        raise ConfigError("database_url %r: %s (PostgreSQL URLs look like "
                          "postgresql+psycopg://USER@/DB?host=/run/postgresql)" % (_safe_url(url), e)) from e


def private_sqlite_files(path: Path) -> None:
    """Make the database file ``path`` DB_FILE_MODE before SQLite opens it (an empty file is an
    empty database), and take every bit beyond it off the file and its journal: an older install
    made them 0644, and SQLite creates the journal with the database file's mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, DB_FILE_MODE))
    except FileExistsError:
        pass
    for p in (path, *(path.with_name(path.name + s) for s in JOURNAL_SUFFIXES)):
        try:
            mode = p.stat().st_mode & 0o777
        except FileNotFoundError:
            continue
        if mode & ~DB_FILE_MODE:
            try:
                os.chmod(p, mode & DB_FILE_MODE)
            except PermissionError as e:
                raise ConfigError("database file %s has mode %04o and this account cannot change it: run "
                                  "`chmod %04o %s` as its owner (the portal's database is for the portal only)"
                                  % (p, mode, DB_FILE_MODE, p)) from e
            log.warning("database file %s had mode %04o: now %04o", p, mode, mode & DB_FILE_MODE)


def _safe_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparseable url>"


def alembic_config(engine: sa.Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if engine is not None:
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (idempotent)."""
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    log.info("database schema at %s", current_revision(engine))


def current_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head() or ""


def check_schema(engine: sa.Engine) -> None:
    """Refuse to run on a database whose schema is not the code's (run ``aiportal db upgrade``)."""
    have, want = current_revision(engine), head_revision()
    if have != want:
        raise ConfigError("database %s is at schema revision %s, this portal needs %s: run "
                          "`aiportal db upgrade`" % (_safe_url(str(engine.url)), have or "(empty)", want))


@contextmanager
def session_scope(engine: sa.Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise

"""The SQLite database holds password and token hashes and every job's request: it and its
journal are the portal's alone (0600), whether `aiportal db upgrade` makes it under a umask that
would leave it 0644, or an older install left it and its -wal/-shm 0644 (the portal narrows them
as it starts; SQLite gives a new journal the database file's mode)."""
import os
import sqlite3
import stat
import subprocess
from pathlib import Path

from portal import db as dbmod
from tests.portal.conftest import VENV_BIN, free_port, start_gunicorn, write_test_config
from tests.conftest import stop_process


def modes(db: Path) -> dict[str, str]:
    """The mode of the database and of each journal file beside it."""
    files = [db, *(db.with_name(db.name + s) for s in dbmod.JOURNAL_SUFFIXES)]
    return {p.name: "%04o" % stat.S_IMODE(p.stat().st_mode) for p in files if p.exists()}


def _umask_022():
    os.umask(0o022)


def test_db_upgrade_makes_the_database_0600_under_a_wide_umask(tmp_path):
    config = write_test_config(tmp_path)
    env = dict(os.environ, AIPORTAL_CONFIG=str(config))
    res = subprocess.run([str(VENV_BIN / "aiportal"), "db", "upgrade", "--config", str(config)], env=env,
                         capture_output=True, text=True, timeout=120, preexec_fn=_umask_022)
    assert res.returncode == 0, res.stdout + res.stderr
    assert modes(tmp_path / "portal.db") == {"portal.db": "0600"}


def test_the_portal_narrows_an_older_installs_database_and_journal_as_it_starts(tmp_path):
    config = write_test_config(tmp_path)
    db = tmp_path / "portal.db"
    dbmod.upgrade(dbmod.make_engine("sqlite:///%s" % db))
    # an older install: the database open in WAL mode (its -wal and -shm exist), all 0644
    held = sqlite3.connect(db)
    try:
        held.execute("PRAGMA journal_mode=WAL")
        held.execute("CREATE TABLE older_install (x)")
        held.commit()
        for name in ("portal.db", "portal.db-wal", "portal.db-shm"):
            os.chmod(tmp_path / name, 0o644)
        assert modes(db) == {"portal.db": "0644", "portal.db-wal": "0644", "portal.db-shm": "0644"}
        env = dict(os.environ, AIPORTAL_CONFIG=str(config))
        proc = start_gunicorn(tmp_path, env, free_port(), workers=1, threads=2)
        try:
            assert modes(db) == {"portal.db": "0600", "portal.db-wal": "0600", "portal.db-shm": "0600"}
        finally:
            stop_process(proc)
    finally:
        held.close()
    assert "portal.db had mode 0644: now 0600" in (tmp_path / "portal.log").read_text()


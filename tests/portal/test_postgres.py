"""The portal on PostgreSQL (``database_url = "postgresql+psycopg://..."``): the migrations
build the models' schema, and the API's main flows work on it.

A throwaway PostgreSQL cluster (Debian's ``postgresql`` package, which `make test` installs)
is initialised in a temporary folder and listens on a unix socket there only (DESIGN.md: no
TCP port); it is stopped with ``pg_ctl`` (its pid file) at the end."""
import glob
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import Session, SQLModel, select

from portal import db as dbmod
from portal.app import create_app
from portal.models import Job, User
from portal.services import accounts
from tests.portal.conftest import TEST_SIF, FakeBackend, bearer

pytestmark = pytest.mark.postgres

JOB = {"image": TEST_SIF, "node_type": "1card", "command": ["true"]}


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/%s" % name))
    return found[-1] if found else None


def _run(argv, timeout=120):
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, "%s exited %d: %s%s" % (argv, res.returncode, res.stdout, res.stderr)


@pytest.fixture(scope="module")
def pg_url():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries are not installed (`make test` installs Debian's postgresql)")
    # pytest's own temporary folders are private to root; the server runs as postgres
    data = Path(tempfile.mkdtemp(prefix="aiportal-pg-", dir="/var/tmp"))
    shutil.chown(data, "postgres", "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"]
    try:
        _run(as_pg + [initdb, "-D", str(data), "--auth=trust", "--username=aiportal", "--encoding=UTF8"])
        _run(as_pg + [pg_ctl, "-D", str(data), "-l", str(data / "server.log"), "-w", "-t", "60", "-o",
                      "-c listen_addresses='' -k %s" % data, "start"])
        yield "postgresql+psycopg://aiportal@/postgres?host=%s" % data
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(as_pg + [pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, timeout=90)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def pg_engine(pg_url):
    engine = dbmod.make_engine(pg_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    dbmod.upgrade(engine)
    yield engine
    engine.dispose()


def test_migrations_build_the_models_schema_on_postgres(pg_engine):
    assert dbmod.current_revision(pg_engine) == dbmod.head_revision()
    with pg_engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []


def test_api_flows_on_postgres(pg_engine, settings):
    with Session(pg_engine, expire_on_commit=False) as db:
        alice = accounts.add_user(db, "alice", "alice", "alice-password-1")
        bob = accounts.add_user(db, "bob", "bob")
        tokens = {"alice": accounts.create_token(db, alice)[0], "bob": accounts.create_token(db, bob)[0]}
        db.commit()
    backend = FakeBackend()
    client = create_app({"TESTING": True}, settings=settings, engine=pg_engine, backend=backend).test_client()
    r = client.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json=JOB)
    assert r.status_code == 201, r.get_json()
    jid = r.get_json()["id"]
    assert client.get("/api/v1/jobs/%s" % jid, headers=bearer(tokens["alice"])).get_json()["events"][0]["kind"] == "submitted"
    assert client.get("/api/v1/jobs/%s" % jid, headers=bearer(tokens["bob"])).status_code == 404
    assert client.get("/api/v1/jobs?state=PENDING", headers=bearer(tokens["alice"])).get_json()["total"] == 1
    assert client.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json={**JOB, "node_type": "9card"}).status_code == 422
    r = client.post("/api/v1/datasources", headers=bearer(tokens["alice"]), json={
        "name": "lab", "endpoint": "http://127.0.0.1:9000", "access_key": "AKIAEXAMPLE123", "secret_key": "s" * 20,
        "check": False})
    assert r.status_code == 201
    for _ in range(5):
        client.post("/login", data={"name": "alice", "password": "wrong", "csrf": "x"})
    with Session(pg_engine) as db:
        assert db.exec(select(Job)).one().state.value == "PENDING"
        assert db.exec(select(User).where(User.name == "alice")).one().unix_user == "alice"
    # the reconciler's cycle against the same database
    from portal.daemons.reconcile import Reconciler
    stats = Reconciler(pg_engine, backend, settings).cycle()
    assert stats.jobs == 1 and stats.slurm_calls == 1


def test_idempotency_keys_on_postgres(pg_engine, settings, monkeypatch):
    """One job per key, and a key whose request died before storing is taken over (the
    compare-and-set on its timestamp) and run once under the id it reserved."""
    import datetime as dt

    from sqlalchemy import update

    from portal.models import IdempotencyKey, utcnow
    from portal.services import submit as submission
    from tests.portal.test_idempotency import Killed
    with Session(pg_engine, expire_on_commit=False) as db:
        token = accounts.create_token(db, accounts.add_user(db, "alice", "alice"))[0]
        db.commit()
    backend = FakeBackend()
    client = create_app({"TESTING": True}, settings=settings, engine=pg_engine, backend=backend).test_client()
    headers = {**bearer(token), "Idempotency-Key": "pg-key-1"}
    first = client.post("/api/v1/jobs", headers=headers, json=JOB)
    again = client.post("/api/v1/jobs", headers=headers, json=JOB)
    assert first.status_code == again.status_code == 201 and again.get_data() == first.get_data()
    real = submission.check

    def check_once(*a, **kw):
        monkeypatch.setattr(submission, "check", real)
        raise Killed()
    monkeypatch.setattr(submission, "check", check_once)
    headers = {**bearer(token), "Idempotency-Key": "pg-key-2"}
    with pytest.raises(Killed):
        client.post("/api/v1/jobs", headers=headers, json=JOB)
    assert client.post("/api/v1/jobs", headers=headers, json=JOB).status_code == 409
    with Session(pg_engine) as db:
        db.exec(update(IdempotencyKey).values(claimed_at=utcnow() - dt.timedelta(hours=1)))
        db.commit()
        reserved = db.exec(select(IdempotencyKey).where(IdempotencyKey.key == "pg-key-2")).one().resource_id
    r = client.post("/api/v1/jobs", headers=headers, json=JOB)
    assert r.status_code == 201 and r.get_json()["id"] == reserved
    assert len(backend.submitted) == 2
    with Session(pg_engine) as db:
        assert len(db.exec(select(Job)).all()) == 2

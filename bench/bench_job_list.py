"""The job list with 10,000 jobs: the web page and the API against a bare query.

    .venv/bin/python bench/bench_job_list.py [--jobs 10000] [--runs 30]

Inserts ``--jobs`` jobs (one executemany) into a fresh, migrated SQLite file in a temporary
folder, then times, in-process through Flask's test client (no network, no gunicorn):

- ``GET /jobs`` (page 1, 50 rows, rendered HTML) logged in as the owner of all the jobs, and
  as an admin (every job, owner column);
- ``GET /api/v1/jobs`` (50 jobs as JSON) with the owner's API token;
- the baseline: the bare ``SELECT ... WHERE user_id = ? ORDER BY created_at DESC LIMIT 50`` on
  the same file (SQLAlchemy Core, rows fetched), which no page can beat.

Prints the median and p95 of each, and the ratio of each median to the baseline's.
Target: each page under 300 ms.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sqlalchemy as sa  # noqa: E402
from cryptography.fernet import Fernet  # noqa: E402
from sqlmodel import Session  # noqa: E402

from portal import db as dbmod  # noqa: E402
from portal.app import create_app  # noqa: E402
from portal.models import Job  # noqa: E402
from portal.services import accounts  # noqa: E402
from portal.settings import Settings  # noqa: E402

TARGET_S = 0.300
STATES = ("COMPLETED", "RUNNING", "PENDING", "FAILED", "CANCELLED")


def insert_jobs(engine: sa.Engine, user_id: int, n: int) -> None:
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    rows = [{"id": str(uuid.uuid4()), "user_id": user_id, "name": "job-%05d" % i, "state": STATES[i % len(STATES)],
             "node_type": "1card", "partition": "gpu-1card", "gpus": 1, "slurm_job_id": str(100000 + i),
             "external": i % 20 == 0, "image": "/srv/aiportal/shared/images/base/x.sif",
             "request_json": '{"command": ["python3", "train.py"], "time_limit": "01:00:00"}',
             "script": "#!/bin/bash\n" + "#SBATCH --x\n" * 20, "job_dir": "/srv/aiportal/shared/users/alice/jobs/x",
             "reason": "", "nodes": "g1n1", "restarts": 0,
             "created_at": t0 + dt.timedelta(seconds=i), "updated_at": t0 + dt.timedelta(seconds=i)}
            for i in range(n)]
    with engine.begin() as conn:
        conn.execute(sa.insert(Job.__table__), rows)


def timed(fn, runs: int) -> list[float]:
    fn()                                   # warm up (templates compiled, caches filled)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, round(0.95 * len(xs)) - 1)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = "sqlite:///%s/portal.db" % tmp
        settings = Settings.from_mapping({"secret_key": "b" * 64, "data_key": Fernet.generate_key().decode(),
                                          "admin_token_sha256": hashlib.sha256(b"unused").hexdigest(),
                                          "database_url": url})
        engine = dbmod.make_engine(url)
        dbmod.upgrade(engine)
        with Session(engine, expire_on_commit=False) as db:
            alice = accounts.add_user(db, "alice", "alice", "alice-password-1")
            accounts.add_user(db, "boss", "alice", "boss-password-22", admin=True)
            token, _ = accounts.create_token(db, alice, "bench")
            db.commit()
        t0 = time.perf_counter()
        insert_jobs(engine, alice.id, args.jobs)
        print("inserted %d jobs in %.2f s (SQLite file, migrated schema)" % (args.jobs, time.perf_counter() - t0))

        app = create_app({"TESTING": True}, settings=settings, engine=engine)
        clients = {}
        for name, pw in (("alice", "alice-password-1"), ("boss", "boss-password-22")):
            c = app.test_client()
            page = c.get("/login").get_data(as_text=True)
            csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
            assert c.post("/login", data={"name": name, "password": pw, "csrf": csrf}).status_code == 302
            clients[name] = c

        def page(who):
            def get():
                r = clients[who].get("/jobs")
                assert r.status_code == 200 and "page 1 of" in r.get_data(as_text=True)
            return get

        def api():
            r = clients["alice"].get("/api/v1/jobs", headers={"Authorization": "Bearer " + token})
            assert r.status_code == 200 and len(r.get_json()["jobs"]) == 50

        jobs = Job.__table__
        bare = sa.select(jobs).where(jobs.c.user_id == alice.id).order_by(jobs.c.created_at.desc()).limit(50)

        def baseline():
            with engine.connect() as conn:
                assert len(conn.execute(bare).fetchall()) == 50

        results = [("bare SELECT ... LIMIT 50", timed(baseline, args.runs)),
                   ("GET /jobs (owner)", timed(page("alice"), args.runs)),
                   ("GET /jobs (admin, all jobs)", timed(page("boss"), args.runs)),
                   ("GET /api/v1/jobs (owner, token)", timed(api, args.runs))]
        engine.dispose()
    base = statistics.median(results[0][1])
    print("%d jobs, %d runs each (in-process, Flask test client):" % (args.jobs, args.runs))
    for name, xs in results:
        med = statistics.median(xs)
        verdict = "" if name.startswith("bare") else "  target < %d ms: %s" % (TARGET_S * 1e3,
                                                                               "met" if med < TARGET_S else "MISSED")
        print("  %-32s median %7.2f ms  p95 %7.2f ms  ratio %6.1fx%s"
              % (name, med * 1e3, p95(xs) * 1e3, med / base, verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())

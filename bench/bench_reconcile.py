"""Reconcile cycle with 1,000 live jobs: time and Slurm calls per cycle, against the bare
``squeue`` call the cycle makes, measured in the same run.

1,000 live jobs are 1,000 tasks of one held array job of alice's (one sbatch instead of
1,000); each portal job in a fresh SQLite database points at one task. Cycle 1 records a
change for every job (stored as RUNNING, Slurm says PENDING), cycle 2 finds nothing to change.

    .venv/bin/python bench/bench_reconcile.py [--jobs 1000] [--runs 5]

Needs the dev cluster (`make run`) and root (submits as alice).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlmodel import Session  # noqa: E402

from portal import db as dbmod  # noqa: E402
from portal.models import Job, User  # noqa: E402
from portal.daemons.reconcile import Reconciler  # noqa: E402
from portal.settings import Settings  # noqa: E402
from slurm.backend import SlurmCli  # noqa: E402
from slurm.states import JobState  # noqa: E402


class Counting(SlurmCli):
    """SlurmCli that counts the Slurm commands a cycle runs."""

    calls = 0

    def _call(self, argv, stdin=None, **kw):
        Counting.calls += 1
        return super()._call(argv, stdin, **kw)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    backend = Counting()
    out = subprocess.run(["runuser", "-u", "alice", "--", "sbatch", "--parsable", "--hold", "--array",
                          "0-%d" % (args.jobs - 1), "--partition", "gpu-1card", "--output", "/dev/null",
                          "--chdir", "/tmp", "--time", "5", "--job-name", "bench-reconcile", "--wrap", "true"],
                         capture_output=True, text=True, check=True, timeout=120)
    array = out.stdout.strip().split(";")[0]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            engine = dbmod.make_engine("sqlite:///%s/bench.db" % tmp)
            dbmod.upgrade(engine)
            with Session(engine) as db:
                user = User(name="alice", unix_user="alice")
                db.add(user)
                db.flush()
                db.add_all([Job(user_id=user.id, name="b%d" % i, state=JobState.RUNNING,
                                slurm_job_id="%s_%d" % (array, i)) for i in range(args.jobs)])
                db.commit()
            settings = Settings.from_mapping({}, require_secrets=False)
            rec = Reconciler(engine, backend, settings)
            deadline = time.monotonic() + 60
            while len(backend.queue()) < args.jobs and time.monotonic() < deadline:
                time.sleep(0.5)
            bare = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                backend.queue()
                bare.append(time.perf_counter() - t0)
            Counting.calls = 0
            first = rec.cycle()
            first_calls = Counting.calls
            steady, calls = [], []
            for _ in range(args.runs):
                Counting.calls = 0
                s = rec.cycle()
                steady.append(s.seconds)
                calls.append(Counting.calls)
                assert s.updated == 0, s
            b, c = statistics.median(bare), statistics.median(steady)
            print("%d live jobs (tasks of held array %s), %d runs each:" % (args.jobs, array, args.runs))
            print("  bare squeue (all jobs)          median %7.1f ms" % (b * 1000))
            print("  cycle 1 (%4d jobs changed)      %7.1f ms  Slurm calls %d" % (first.updated, first.seconds * 1000,
                                                                                 first_calls))
            print("  cycle, nothing changed          median %7.1f ms  max %7.1f ms  Slurm calls %s  ratio %.2fx"
                  % (c * 1000, max(steady) * 1000, sorted(set(calls)), c / b))
            print("  target < 1 s with one Slurm query: %s" % (
                "met" if max(steady + [first.seconds]) < 1 and set(calls) == {1} and first_calls == 1 else "NOT met"))
            engine.dispose()
    finally:
        subprocess.run(["scancel", array], check=False, timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())

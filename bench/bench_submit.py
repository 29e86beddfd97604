"""Submission and status benchmarks against the dev cluster (needs `make run`).

    .venv/bin/python bench/bench_submit.py [--jobs 200] [--status-jobs 1000]

1. Submit latency and throughput: the backend's submit() against plain `sbatch --parsable`
   (both as the job user through runuser, both with the script on stdin), interleaved in the
   same run so machine noise hits both. Target: backend within 1.2x of sbatch.
2. Status of many jobs in one call: statuses() of N held jobs. Target: under 0.5 s for 1,000.
All jobs are submitted held (--hold) and cancelled at the end.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slurm.backend import SlurmCli  # noqa: E402

USER = "alice"
SCRIPT = "#!/bin/bash\n#SBATCH --partition=gpu-1card\n#SBATCH --time=1\n#SBATCH --hold\n#SBATCH --output=/dev/null\ntrue\n"


def plain_sbatch() -> str:
    res = subprocess.run(["runuser", "-u", USER, "--", "sbatch", "--parsable"], input=SCRIPT,
                         capture_output=True, text=True, check=True, timeout=30, cwd="/")
    return res.stdout.strip().split(";")[0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--status-jobs", type=int, default=1000)
    args = ap.parse_args()
    backend = SlurmCli(timeout=60)
    ids: list[str] = []
    try:
        t_plain, t_backend = [], []
        for i in range(args.jobs):
            # alternate which goes first, so neither always meets a warmer slurmctld
            order = [("plain", plain_sbatch), ("backend", lambda: backend.submit(SCRIPT, user=USER))]
            if i % 2:
                order.reverse()
            for name, fn in order:
                t0 = time.perf_counter()
                ids.append(fn())
                (t_plain if name == "plain" else t_backend).append(time.perf_counter() - t0)
        p50p, p50b = statistics.median(t_plain), statistics.median(t_backend)
        print("submit, %d jobs each: sbatch p50 %.1f ms (%.1f jobs/s), backend p50 %.1f ms (%.1f jobs/s); "
              "ratio backend/sbatch %.2fx (target <= 1.2x)"
              % (args.jobs, p50p * 1e3, len(t_plain) / sum(t_plain), p50b * 1e3, len(t_backend) / sum(t_backend),
                 sum(t_backend) / sum(t_plain)))
        while len(ids) < args.status_jobs:
            ids.append(backend.submit(SCRIPT, user=USER))
        wanted = ids[:args.status_jobs]
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            got = backend.statuses(wanted)
            runs.append(time.perf_counter() - t0)
        assert len(got) == len(wanted), (len(got), len(wanted))
        t0 = time.perf_counter()
        subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, check=True)
        baseline = time.perf_counter() - t0
        print("status of %d jobs in one call: best %.3f s, median %.3f s (bare squeue %.3f s; target < 0.5 s)"
              % (len(wanted), min(runs), statistics.median(runs), baseline))
    finally:
        for start in range(0, len(ids), 500):
            subprocess.run(["scancel", *ids[start:start + 500]], capture_output=True, timeout=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())

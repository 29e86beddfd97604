"""Log latency to the browser: a line written into a job's log on the node, until it arrives
in the portal's Server-Sent Events stream (`GET /api/v1/jobs/ID/log?follow=1`, what the job
page's EventSource reads), against `follow_log` straight over SSH in the same run.

    .venv/bin/python bench/bench_log_sse.py [--lines 300]

Starts its own portal (``start_test_portal``: gunicorn, gthread, on a free port of 9110-9149) on a temporary
database with a RUNNING job of alice's whose log is a file in alice's folder; a writer running
as alice appends lines carrying their write time. Target: p95 under 1 s. Stops the portal by
pid. Needs the dev cluster's sshd (`make run`) and root.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sqlmodel import Session, select  # noqa: E402

from bench_log_latency import WRITER, Latencies  # noqa: E402
from portal.logs.follow import follow_log  # noqa: E402
from portal.logs.tail import target_for  # noqa: E402
from portal.models import Job, User  # noqa: E402
from portal.settings import Settings  # noqa: E402
from slurm.states import JobState  # noqa: E402
from tests.portal.conftest import start_test_portal  # noqa: E402

SHARED_USERS = Path("/srv/aiportal/shared/users")


def summary(name: str, lat: Latencies) -> tuple[float, float]:
    values = list(lat.values.values())
    q = statistics.quantiles(values, n=100)
    print("  %-34s p50 %6.1f ms  p95 %6.1f ms  max %6.1f ms  (%d lines)"
          % (name, q[49] * 1e3, q[94] * 1e3, max(values) * 1e3, len(values)))
    return q[49], q[94]


def sse_reader(url: str, token: str, sink: Latencies, stop: threading.Event) -> None:
    req = urllib.request.Request(url, headers={"Authorization": "Bearer " + token, "Accept": "text/event-stream"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        event, data = None, []
        for raw in resp:
            if stop.is_set():
                return
            line = raw.rstrip(b"\r\n")
            if not line:
                if event == b"log" and data:
                    sink.feed(json.loads(b"\n".join(data))["text"].encode())
                event, data = None, []
            elif line.startswith(b"event:"):
                event = line[6:].strip()
            elif line.startswith(b"data:"):
                data.append(line[5:].lstrip())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=300)
    ap.add_argument("--min-gap", type=float, default=0.005)
    ap.add_argument("--max-gap", type=float, default=0.2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sse-"))
    job_dir = SHARED_USERS / "alice" / ("bench-sse-%s" % uuid.uuid4().hex[:8])
    (job_dir / "logs").mkdir(parents=True)
    for d in (job_dir, job_dir / "logs"):
        shutil.chown(d, "alice", "alice")
        os.chmod(d, 0o700)
    portal = start_test_portal(tmp, workers=1, threads=8)
    settings = Settings.load(portal.config)
    token = portal.tokens["alice"]
    with Session(portal.engine) as db:
        alice = db.exec(select(User).where(User.name == "alice")).one()
        job = Job(user_id=alice.id, name="bench", state=JobState.RUNNING, slurm_job_id="999999", job_dir=str(job_dir))
        db.add(job)
        db.commit()
        job_id = job.id
    log = job_dir / "logs" / "slurm-999999.out"
    stop = threading.Event()
    sse, direct = Latencies(), Latencies()
    try:
        url = "%s/api/v1/jobs/%s/log?follow=1" % (portal.url, job_id)
        readers = [threading.Thread(target=sse_reader, args=(url, token, sse, stop), daemon=True)]

        def follow_direct():
            for chunk in follow_log(target_for(settings, "alice"), str(log), 0, heartbeat_s=1.0, stop=stop):
                direct.feed(chunk.data)
        readers.append(threading.Thread(target=follow_direct, daemon=True))
        for t in readers:
            t.start()
        time.sleep(1.5)        # both readers connected
        subprocess.run(["runuser", "-u", "alice", "--", "/usr/bin/python3", "-c", WRITER, str(log), str(args.lines),
                        str(args.min_gap), str(args.max_gap), "7"], check=True, timeout=600)
        time.sleep(1.5)
        stop.set()
        print("%d lines written as alice (gaps %g-%g s); portal %s" % (args.lines, args.min_gap, args.max_gap, url))
        d, s = summary("follow_log over SSH (direct)", direct), summary("portal SSE stream (browser path)", sse)
        print("ratio SSE/direct: p50 %.2fx, p95 %.2fx; target p95 < 1 s: %s"
              % (s[0] / d[0], s[1] / d[1], "met" if s[1] < 1.0 and len(sse.values) == args.lines else "NOT met"))
    finally:
        stop.set()
        portal.stop()
        shutil.rmtree(job_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

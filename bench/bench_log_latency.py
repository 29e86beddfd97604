"""Live log latency: follow_log over SSH against a local `tail -F`, in the same run.

    .venv/bin/python bench/bench_log_latency.py [--lines 300] [--min-gap 0.005] [--max-gap 0.2] [--user alice]

A writer process running as the job user appends ``--lines`` lines to a log in a folder of that
user on the shared filesystem, at random intervals (uniform between the two gaps), each line
carrying its write time. Two readers follow the same file at the same time:

* ``portal.logs.tail.follow_log`` as the user, through the loopback log sshd (what the portal does);
* a local ``tail -c +1 -F -s 0.5`` subprocess as root (the baseline: no SSH, no login).

For each reader: p50, p95 and max of (time received - time written) over all lines, and the
ratio SSH/local. Target: p95 under 1 s for the SSH reader. Needs the dev cluster's sshd
(`make run`) and root (the writer switches to the user; the portal key is root-only).
"""
from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from portal.logs.follow import follow_log  # noqa: E402
from portal.logs.tail import target_for  # noqa: E402
from portal.settings import Settings  # noqa: E402

SHARED_USERS = Path("/srv/aiportal/shared/users")

# runs as the job user under the system python (the venv may not be readable by the user)
WRITER = """
import random, sys, time
path, n, lo, hi, seed = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
rnd = random.Random(seed)
with open(path, "ab", buffering=0) as f:
    for i in range(n):
        time.sleep(rnd.uniform(lo, hi))
        f.write(b"seq=%d t=%.6f some training output to make the line look real\\n" % (i, time.time()))
"""
LINE = re.compile(rb"seq=(\d+) t=([0-9.]+)")


class Latencies:
    """Splits a byte stream into lines and records receive - write time per line."""

    def __init__(self):
        self.values: dict[int, float] = {}
        self._buf = b""

    def feed(self, data: bytes) -> None:
        now = time.time()
        *lines, self._buf = (self._buf + data).split(b"\n")
        for line in lines:
            m = LINE.search(line)
            if m:
                self.values[int(m.group(1))] = now - float(m.group(2))


def read_ssh(user: str, path: Path, out: Latencies, stop: threading.Event) -> None:
    for chunk in follow_log(target_for(Settings(), user), str(path), heartbeat_s=1.0, stop=stop):
        out.feed(chunk.data)


def read_local_tail(proc: subprocess.Popen, out: Latencies) -> None:
    while True:
        data = os.read(proc.stdout.fileno(), 65536)
        if not data:
            return
        out.feed(data)


def summary(name: str, values: list[float]) -> str:
    q = statistics.quantiles(values, n=100)
    return "%-22s p50 %6.1f ms  p95 %6.1f ms  max %6.1f ms  (%d lines)" % (
        name, q[49] * 1e3, q[94] * 1e3, max(values) * 1e3, len(values))


def make_log(user: str) -> tuple[Path, Path]:
    pw = pwd.getpwnam(user)
    root = SHARED_USERS / user / ("bench-logtail-%s" % uuid.uuid4().hex[:10])
    (root / "logs").mkdir(parents=True, mode=0o700)
    for d in (root, root / "logs"):
        os.chown(d, pw.pw_uid, pw.pw_gid)
    log = root / "logs" / "slurm-1.out"
    log.touch()
    os.chown(log, pw.pw_uid, pw.pw_gid)
    return root, log


def wait_all(readers: list[Latencies], n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(len(r.values) < n for r in readers) and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=300)
    ap.add_argument("--min-gap", type=float, default=0.005)
    ap.add_argument("--max-gap", type=float, default=0.2)
    ap.add_argument("--user", default="alice")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    root, log = make_log(args.user)
    pw = pwd.getpwnam(args.user)
    ssh, local, stop = Latencies(), Latencies(), threading.Event()
    tail = subprocess.Popen(["tail", "-c", "+1", "-F", "-s", "0.5", str(log)], stdout=subprocess.PIPE)
    readers = [threading.Thread(target=read_ssh, args=(args.user, log, ssh, stop)),
               threading.Thread(target=read_local_tail, args=(tail, local))]
    try:
        for t in readers:
            t.start()
        time.sleep(1.0)   # both readers connected and waiting
        t0 = time.monotonic()
        subprocess.run(["/usr/bin/python3", "-c", WRITER, str(log), str(args.lines), str(args.min_gap),
                        str(args.max_gap), str(args.seed)], user=pw.pw_uid, group=pw.pw_gid,
                       extra_groups=[], check=True, timeout=args.lines * args.max_gap + 60)
        wrote = time.monotonic() - t0
        wait_all([ssh, local], args.lines, timeout=10)
    finally:
        stop.set()
        tail.terminate()
        tail.wait(10)
        for t in readers:
            t.join(15)
        tail.stdout.close()
        shutil.rmtree(root, ignore_errors=True)
    print("%d lines written as %s in %.1f s (gaps %.0f-%.0f ms)"
          % (args.lines, args.user, wrote, args.min_gap * 1e3, args.max_gap * 1e3))
    s, b = list(ssh.values.values()), list(local.values.values())
    print(summary("follow_log over SSH", s))
    print(summary("local tail -F", b))
    p95s, p95b = statistics.quantiles(s, n=100)[94], statistics.quantiles(b, n=100)[94]
    print("ratio SSH/local: p50 %.2fx, p95 %.2fx; target p95 < 1 s: %s"
          % (statistics.median(s) / statistics.median(b), p95s / p95b, "met" if p95s < 1.0 else "NOT met"))
    return 0 if len(s) == len(b) == args.lines else 1


if __name__ == "__main__":
    sys.exit(main())

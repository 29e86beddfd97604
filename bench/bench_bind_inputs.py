"""Job start with a big input on the shared filesystem: bound read-only (the default) against
copied (``--stage copy``), with a small bound input as the baseline, in the same run.

    .venv/bin/python bench/bench_bind_inputs.py [--gb 5] [--mb 5]

Run as root after `make run`: it makes two folders of alice's on the shared filesystem (the big
one with ``fallocate``: its size is on disk, so a copy has to write all of it), submits three
jobs through the installed portal as alice (`aiportal submit --follow`, the site's python image)
and reads, from each job's log, the seconds from the start of its run to the start of its
command (the log's stamps are whole seconds). Everything it made is removed at the end.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

SHARED = Path("/srv/aiportal/shared")
IMAGE = "docker://localhost:5000/site/python:1"


def _stamp(line: str) -> dt.datetime:
    return dt.datetime.strptime(re.match(r"\[aiportal (\S+)\]", line).group(1), "%Y-%m-%dT%H:%M:%S")


def start_delay(env: dict, folder: Path, stage: str) -> float:
    res = subprocess.run(["aiportal", "submit", "--image", IMAGE, "--node-type", "1card", "--time", "30",
                          "--name", "bench-%s-%s" % (stage, folder.name), "--input", str(folder), "--stage", stage,
                          "--follow", "--", "python3", "-c", "print('started')"],
                         capture_output=True, text=True, env=env, timeout=3600)
    if res.returncode != 0:
        raise SystemExit("the %s job failed:\n%s\n%s" % (stage, res.stdout[-3000:], res.stderr[-3000:]))
    lines = res.stdout.splitlines()
    first = next(line for line in lines if line.startswith("[aiportal ") and " run " in line and " on " in line)
    start = next(line for line in lines if line.startswith("[aiportal ") and "] run: " in line)
    return (_stamp(start) - _stamp(first)).total_seconds()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=int, default=5, help="size of the big input (GB)")
    ap.add_argument("--mb", type=int, default=5, help="size of the small input (MB)")
    args = ap.parse_args()
    token = subprocess.run(["aiportal", "token", "create", "--user", "alice", "--name", "bench-bind",
                            "--expires-days", "1"], capture_output=True, text=True, check=True).stdout.strip()
    env = dict(os.environ, AIPORTAL_TOKEN=token)
    base = SHARED / "users" / "alice" / ("bench-bind-%s" % uuid.uuid4().hex[:8])
    small, big = base / "small", base / "big"
    try:
        for d in (small, big):
            d.mkdir(parents=True)
        (small / "part-0").write_bytes(b"\0" * (args.mb << 20))
        subprocess.run(["fallocate", "-l", "%dG" % args.gb, str(big / "part-0")], check=True)
        subprocess.run(["chown", "-R", "alice:alice", str(base)], check=True)
        baseline = start_delay(env, small, "bind")
        bound = start_delay(env, big, "bind")
        copied = start_delay(env, big, "copy")
        print("command start after the run began (whole seconds):")
        print("  %d MB bound (baseline): %.0f s" % (args.mb, baseline))
        print("  %d GB bound:            %.0f s (%+.0f s against the baseline)" % (args.gb, bound, bound - baseline))
        print("  %d GB copied:           %.0f s (%+.0f s against the baseline)" % (args.gb, copied, copied - baseline))
    finally:
        shutil.rmtree(base, ignore_errors=True)
        for line in subprocess.run(["aiportal", "token", "list", "--user", "alice"], capture_output=True,
                                   text=True).stdout.splitlines():
            if "bench-bind" in line:
                subprocess.run(["aiportal", "token", "revoke", line.split()[0], "--user", "alice"], capture_output=True)


if __name__ == "__main__":
    main()

"""API submission latency against the backend's bare submit, in the same run (needs `make run`).

    .venv/bin/python bench/bench_api_submit.py [--jobs 20] [--port 9102] [--sif BASE.sif]

Starts a portal of its own like the tests' live portal does (gunicorn gthread, 2 workers x 16
threads, a fresh SQLite database, user alice with an API token) on 127.0.0.1:PORT (the first
free one of 9150-9199 when PORT is taken: other test runs start portals too), then,
interleaved so machine noise hits both:
1. API: ``POST /api/v1/jobs`` through the CLI's own HTTP helper (``portal.cli._api``: a new
   connection per call, as `aiportal submit` makes), a job that exits at once (``true``);
2. bare: ``SlurmCli.submit`` of the same rendered script (the one the portal stored for a
   warm-up submission) as alice, the floor any submission path pays (runuser + sbatch).
Target: API median within 1.3x of bare. Also prints the fixed cost of any authenticated API
call (``GET /api/v1/me``), to tell HTTP and auth apart from the submission's own work.
No reconciler runs (it is not on the submit path).
At the end every job it submitted is cancelled by id, the portal stopped by pid, and the job
folders it made removed.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cryptography.fernet import Fernet  # noqa: E402
from sqlmodel import Session  # noqa: E402

from portal import db as dbmod  # noqa: E402
from portal.cli import _api  # noqa: E402
from portal.services import accounts  # noqa: E402
from portal.settings import Settings  # noqa: E402
from slurm.backend import SlurmCli  # noqa: E402
from tests.conftest import stop_process as stop  # noqa: E402

USER = "alice"
BASE_GLOB = "/srv/aiportal/shared/images/base/debian-python-*.sif"
VENV_BIN = Path(sys.executable).parent


def start_portal(base: Path, port: int) -> tuple[subprocess.Popen, str, Settings]:
    """gunicorn on 127.0.0.1:port with a fresh database and alice; returns (process, token, settings)."""
    config = base / "portal.toml"
    config.write_text("\n".join([
        'secret_key = "%s"' % os.urandom(32).hex(),
        'admin_token_sha256 = "%s"' % hashlib.sha256(os.urandom(16)).hexdigest(),
        'data_key = "%s"' % Fernet.generate_key().decode(),
        'database_url = "sqlite:///%s/portal.db"' % base, ""]))
    os.chmod(config, 0o600)
    settings = Settings.load(config)
    engine = dbmod.make_engine(settings.database_url)
    dbmod.upgrade(engine)
    with Session(engine, expire_on_commit=False) as db:
        token, _ = accounts.create_token(db, accounts.add_user(db, USER, USER), "bench")
        db.commit()
    engine.dispose()
    log = base / "gunicorn.log"
    proc = subprocess.Popen(
        [str(VENV_BIN / "gunicorn"), "--bind", "127.0.0.1:%d" % port, "--worker-class", "gthread",
         "--threads", "16", "--workers", "2", "--error-logfile", str(log), "portal.app:create_app()"],
        env=dict(os.environ, AIPORTAL_CONFIG=str(config)), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        cwd=ROOT)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit("portal exited %s:\n%s" % (proc.returncode, log.read_text()[-3000:]))
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % port, timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline:
                stop(proc)
                raise SystemExit("portal did not answer on port %d in 30 s (is the port taken?):\n%s"
                                 % (port, log.read_text()[-3000:]))
            time.sleep(0.2)
    return proc, token, settings


def free_port(preferred: int) -> int:
    """``preferred`` if nothing listens there, else the first free port of 9150-9199 (tests'
    range, DESIGN.md), said on stderr: other test runs start portals of their own."""
    for port in [preferred, *range(9150, 9200)]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as gunicorn binds: TIME_WAIT is no obstacle
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port != preferred:
            print("port %d is taken; using %d" % (preferred, port), file=sys.stderr)
        return port
    raise SystemExit("no free port (%d, 9150-9199)" % preferred)




def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--port", type=int, default=9102)
    ap.add_argument("--sif", help="image (default: the base image the tests build)")
    args = ap.parse_args()
    sif = args.sif or (sorted(glob.glob(BASE_GLOB)) or [None])[-1]
    if not sif:
        raise SystemExit("no base image under %s: run the tests once (they build it) or pass --sif" % BASE_GLOB)
    base = Path(tempfile.mkdtemp(prefix="bench-api-"))
    os.chmod(base, 0o755)
    port = free_port(args.port)
    proc, token, settings = start_portal(base, port)
    (base / "token").write_text(token)
    cli = argparse.Namespace(url="http://127.0.0.1:%d" % port, token_file=str(base / "token"), timeout=60.0)
    backend = SlurmCli(settings.slurm_conf, 60.0, settings.cluster_name)
    body = {"image": sif, "node_type": "1card", "command": ["true"], "name": "bench-api", "time_limit": "1"}
    slurm_ids: list[str] = []
    job_dirs: list[str] = []
    try:
        def api_submit() -> str:
            job = _api(cli, "POST", "/jobs", body)
            job_dirs.append("%s/users/%s/jobs/%s" % (settings.shared_root, USER, job["id"]))
            return job["slurm_job_id"]

        slurm_ids.append(api_submit())                                  # warm-up: imports, first connections
        script = _api(cli, "GET", "/jobs/%s" % job_dirs[0].rsplit("/", 1)[1])["script"]
        slurm_ids.append(backend.submit(script, user=USER))
        t_api, t_bare, t_me = [], [], []
        for i in range(args.jobs):
            order = [("api", api_submit), ("bare", lambda: backend.submit(script, user=USER))]
            if i % 2:
                order.reverse()
            for name, fn in order:
                t0 = time.perf_counter()
                slurm_ids.append(fn())
                (t_api if name == "api" else t_bare).append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _api(cli, "GET", "/me")
            t_me.append(time.perf_counter() - t0)
        ma, mb = statistics.median(t_api), statistics.median(t_bare)
        print("submit, %d jobs each (1card, `true`): API POST /api/v1/jobs p50 %.1f ms, p95 %.1f ms; "
              "bare SlurmCli.submit p50 %.1f ms, p95 %.1f ms; ratio of medians API/bare %.2fx (target < 1.3x)"
              % (args.jobs, ma * 1e3, pct(t_api, 95) * 1e3, mb * 1e3, pct(t_bare, 95) * 1e3, ma / mb))
        print("fixed cost of one authenticated API call (GET /api/v1/me, new connection): p50 %.1f ms"
              % (statistics.median(t_me) * 1e3))
    finally:
        stop(proc)
        if slurm_ids:
            subprocess.run(["scancel", *slurm_ids], capture_output=True, timeout=120)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                left = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(slurm_ids)],
                                      capture_output=True, text=True, timeout=30).stdout.split()
                if not left:
                    break
                time.sleep(0.5)
        for d in job_dirs:
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

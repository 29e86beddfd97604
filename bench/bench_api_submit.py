"""API submission latency against the backend's bare submit, in the same run (needs `make run`).

    .venv/bin/python bench/bench_api_submit.py [--jobs 20] [--sif BASE.sif]

Starts a portal of its own as deployed: gunicorn (gthread, 2 workers x 16 threads) on a unix
socket behind nginx with the portal role's configuration (``bench_inference.start_nginx``), a
fresh SQLite database, user alice with an API token, nginx on a free port of
127.0.0.1:9110-9149, then, interleaved so machine noise hits both:
1. API: ``POST /api/v1/jobs`` through nginx with the CLI's own HTTP helper (``portal.cli._api``:
   a new connection per call, as `aiportal submit` makes), a job that exits at once (``true``);
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
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from portal.cli import _api  # noqa: E402
from portal.settings import Settings  # noqa: E402
from slurm.backend import SlurmCli  # noqa: E402
from bench.bench_inference import start_nginx  # noqa: E402
from tests.portal.conftest import _wait_http, free_port, start_test_portal  # noqa: E402

USER = "alice"
BASE_GLOB = "/srv/aiportal/shared/images/base/debian-python-*.sif"
VENV_BIN = Path(sys.executable).parent


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--sif", help="image (default: the base image the tests build)")
    args = ap.parse_args()
    sif = args.sif or (sorted(glob.glob(BASE_GLOB)) or [None])[-1]
    if not sif:
        raise SystemExit("no base image under %s: run the tests once (they build it) or pass --sif" % BASE_GLOB)
    base = Path(tempfile.mkdtemp(prefix="bench-api-"))
    portal = start_test_portal(base)
    settings = Settings.load(portal.config)
    (base / "token").write_text(portal.tokens[USER])
    # the front door as deployed: nginx -> gunicorn on a unix socket
    front = subprocess.Popen(
        [str(VENV_BIN / "gunicorn"), "--bind", "unix:%s/portal.sock" % base, "--worker-class", "gthread",
         "--threads", "16", "--workers", "2", "--error-logfile", str(base / "gunicorn-front.log"),
         "portal.app:create_app()"], env=portal.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    portal.procs.append(front)
    deadline = time.monotonic() + 30
    while not (base / "portal.sock").exists():
        assert time.monotonic() < deadline, (base / "gunicorn-front.log").read_text()
        time.sleep(0.1)
    front_port = free_port([p for p in range(9110, 9150) if p != portal.port])
    nginx = start_nginx(base, front_port)
    portal.procs.append(nginx)
    front_url = "http://127.0.0.1:%d" % front_port
    _wait_http(front_url + "/healthz", nginx, base / "nginx-error.log")
    cli = argparse.Namespace(url=front_url, token_file=str(base / "token"), timeout=60.0)
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
        # an automation client keeps its connection (keep-alive through nginx)
        conn = http.client.HTTPConnection("127.0.0.1", front_port, timeout=60)
        headers = {"Authorization": "Bearer " + portal.tokens[USER], "Content-Type": "application/json"}

        def kept_submit() -> str:
            conn.request("POST", "/api/v1/jobs", json.dumps(body), headers)
            resp = conn.getresponse()
            job = json.loads(resp.read())
            assert resp.status == 201, job
            job_dirs.append("%s/users/%s/jobs/%s" % (settings.shared_root, USER, job["id"]))
            return job["slurm_job_id"]

        slurm_ids.append(kept_submit())
        times = {"api": [], "kept": [], "bare": []}
        t_me = []
        for i in range(args.jobs):
            order = [("api", api_submit), ("kept", kept_submit), ("bare", lambda: backend.submit(script, user=USER))]
            if i % 2:
                order.reverse()
            for name, fn in order:
                t0 = time.perf_counter()
                slurm_ids.append(fn())
                times[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _api(cli, "GET", "/me")
            t_me.append(time.perf_counter() - t0)
        t_api, t_kept, t_bare = times["api"], times["kept"], times["bare"]
        ma, mb, mk = statistics.median(t_api), statistics.median(t_bare), statistics.median(t_kept)
        print("submit, %d jobs each (1card, `true`): API POST /api/v1/jobs through nginx p50 %.1f ms, p95 %.1f ms; "
              "bare SlurmCli.submit p50 %.1f ms, p95 %.1f ms; ratio of medians API/bare %.2fx (target < 1.3x)"
              % (args.jobs, ma * 1e3, pct(t_api, 95) * 1e3, mb * 1e3, pct(t_bare, 95) * 1e3, ma / mb))
        print("the same with one kept connection: p50 %.1f ms, p95 %.1f ms; ratio of medians %.2fx"
              % (mk * 1e3, pct(t_kept, 95) * 1e3, mk / mb))
        print("fixed cost of one authenticated API call (GET /api/v1/me, new connection): p50 %.1f ms"
              % (statistics.median(t_me) * 1e3))
    finally:
        portal.stop()
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

"""Inference tier benchmarks, three parts (all in one run):

1. router overhead: the same requests sent straight to a replica and through the portal's
   ``/service/NAME`` (gunicorn, gthread, 2 workers x 16 threads, as deployed), in the same
   run: added p50 latency (sequential, one keep-alive connection) and throughput at
   concurrency 8. Targets: p50 added < 1 ms, throughput >= 0.9x direct.
2. batching: a model whose cost per call is mostly fixed (``FixedCost`` in
   tests/inference/toy_model/model.py: sleeps COST_MS=20 ms per call + 0.2 ms per item: a
   stand-in for a GPU kernel launch, not a real network) at concurrency 32, max batch size 32
   against 1. Target >= 3x.
3. rolling update under load on the dev cluster: a service with 2 replicas (base image, toy
   model), 4 clients sending requests through the router, ``update`` to a new version; every
   failed request is counted. Target 0.

    .venv/bin/python bench/bench_inference.py [--seconds 5] [--skip-cluster]

Parts 1-2 run the serving runtime as a process on loopback (ports 9150-9199); part 3 needs the
dev cluster and root. The portal is its own (port 9110-9149, temporary database), stopped by pid.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import pwd
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlmodel import Session, select  # noqa: E402

from inference.controller import Phase  # noqa: E402
from portal.models import Service, ServiceReplica, User, utcnow  # noqa: E402
from portal.settings import Settings  # noqa: E402
from storage.credentials import SecretBox  # noqa: E402
from tests.inference.conftest import TOY, start_runtime, stop_runtime  # noqa: E402
from tests.portal.conftest import free_port, start_test_portal  # noqa: E402

VENV_BIN = Path(sys.executable).parent
BASE_IMAGE_DIR = Path("/srv/aiportal/shared/images/base")
#: the services' key: the router sends it, the replicas check it (as deployed)
KEY = "bench-replica-key-0123456789abcdef"


class Client:
    """One keep-alive connection; ``post`` returns (status, seconds)."""

    def __init__(self, host, port, path, token=None, key=None):
        self.conn = http.client.HTTPConnection(host, port, timeout=60)
        self.path = path
        self.headers = {"Content-Type": "application/octet-stream"}
        if token:
            self.headers["Authorization"] = "Bearer " + token
        if key:         # straight to a replica: the key the router would send
            self.headers["X-Aiportal-Key"] = key

    def post(self, body: bytes) -> tuple[int, float]:
        t0 = time.perf_counter()
        self.conn.request("POST", self.path, body=body, headers=self.headers)
        resp = self.conn.getresponse()
        self.last = resp.read()
        return resp.status, time.perf_counter() - t0


def sequential(make, n: int) -> list[float]:
    c = make()
    for _ in range(50):
        c.post(b"warm")
    out = []
    for i in range(n):
        status, dt = c.post(b"x%d" % i)
        assert status == 200, (status, c.last)
        out.append(dt)
    return out


def throughput(make, clients: int, seconds: float, body=b"x") -> tuple[float, int]:
    done, failed = [0], [0]
    failures: list = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def run():
        c = make()
        n = bad = 0
        while time.monotonic() < stop:
            status, _ = c.post(body)
            n += 1
            if status != 200:
                bad += 1
                if not failures:
                    failures.append((status, c.last[:300]))
        with lock:
            done[0] += n
            failed[0] += bad
    threads = [threading.Thread(target=run) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        print("  (first failure: %s %r)" % failures[0])
    return done[0] / (time.monotonic() - t0), failed[0]


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000


class Portal:
    """The tests' portal (``start_test_portal``: gunicorn + the router on TCP ports) plus the
    front door as deployed: nginx with the portal role's configuration, passing /service/ to a
    second router and the rest to a second gunicorn, both on unix sockets. The reconciler only
    for part 3."""

    def __init__(self, base: Path):
        self.base = base
        self.p = start_test_portal(base, router=True)
        self.config, self.engine, self.env = self.p.config, self.p.engine, self.p.env
        self.port, self.router_port = self.p.port, int(self.p.service_url.rsplit(":", 1)[1])
        self.token = self.p.tokens["alice"]
        self.box = SecretBox(Settings.load(self.config).data_key)
        with Session(self.engine) as db:
            self.user_id = db.exec(select(User).where(User.name == "alice")).one().id
        self.router = self.p.procs[-1]
        with open(base / "router-front.log", "w") as out:
            self.front_router = subprocess.Popen([str(VENV_BIN / "aiportal"), "router", "--listen",
                                                  "unix:%s/router.sock" % base], env=self.env, stdout=out,
                                                 stderr=subprocess.STDOUT)
        self.p.procs.append(self.front_router)
        self.p.procs.append(subprocess.Popen(
            [str(VENV_BIN / "gunicorn"), "--bind", "unix:%s/portal.sock" % base, "--worker-class", "gthread",
             "--threads", "4", "--workers", "1", "--error-logfile", str(base / "gunicorn-front.log"),
             "portal.app:create_app()"], env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        while not (base / "router.sock").exists():
            assert time.monotonic() < deadline, (base / "router-front.log").read_text()
            time.sleep(0.1)
        self.front_port = free_port([p for p in range(9110, 9150) if p not in (self.port, self.router_port)])
        self.nginx = start_nginx(base, self.front_port)
        self.p.procs.append(self.nginx)
        while True:
            try:
                urllib.request.urlopen("http://127.0.0.1:%d/healthz" % self.front_port, timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "".join(
                    (base / f).read_text() for f in ("gunicorn-front.log", "nginx-error.log") if (base / f).exists())
                time.sleep(0.2)

    def start_reconciler(self):
        with open(self.base / "reconcile.log", "w") as log:
            self.p.procs.append(subprocess.Popen([str(VENV_BIN / "aiportal"), "reconcile"], env=self.env, stdout=log,
                                                 stderr=subprocess.STDOUT))

    def api(self, method, path, body=None):
        req = urllib.request.Request("http://127.0.0.1:%d/api/v1%s" % (self.port, path), method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": "Bearer " + self.token,
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def stop(self):
        self.p.stop()


def start_nginx(base: Path, port: int) -> subprocess.Popen:
    """nginx with the portal role's configuration (ansible/roles/portal/templates/nginx.conf.j2),
    its sockets, logs and temporary folders in ``base``."""
    import jinja2
    template = (REPO / "ansible/roles/portal/templates/nginx.conf.j2").read_text()
    conf = jinja2.Template(template).render(
        aiportal_nginx_workers=1, aiportal_run_dir=str(base), aiportal_log_dir=str(base), aiportal_state_dir=str(base),
        aiportal_portal_max_body="1g", aiportal_portal_socket="%s/portal.sock" % base,
        aiportal_router_socket="%s/router.sock" % base, aiportal_portal_bind="127.0.0.1", aiportal_portal_port=port,
        aiportal_router_timeout_s=300)
    (base / "nginx").mkdir(exist_ok=True)
    (base / "nginx.conf").write_text(conf)
    return subprocess.Popen(["/usr/sbin/nginx", "-c", str(base / "nginx.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)


def with_children(pid: int) -> list[int]:
    """``pid`` and its child processes (nginx's workers)."""
    out = [pid]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def threads_of(pid: int) -> list[int]:
    return [int(t) for t in os.listdir("/proc/%d/task" % pid)]


def cpu_seconds(*pids: int) -> float:
    """CPU time (user + system) of these processes and their children (nginx's workers)."""
    total = 0.0
    for pid in {p for pid in pids for p in with_children(pid)}:
        try:
            f = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return total


def add_service(portal: Portal, name: str, rep) -> None:
    """Service ``name`` of alice's (with the bench's key) whose one READY replica is ``rep``."""
    with Session(portal.engine) as db:
        svc = Service(user_id=portal.user_id, name=name, spec_json=json.dumps({"max_body_bytes": 1 << 20}),
                      key_sealed=portal.box.seal(KEY))
        db.add(svc)
        db.flush()
        db.add(ServiceReplica(service_id=svc.id, phase=Phase.READY, host=rep.host, port=rep.port, version="v1",
                              ready_at=utcnow()))
        db.commit()


def part_router(portal: Portal, tmp: Path, n: int, seconds: float) -> None:
    rep = start_runtime(tmp / "echo", max_batch_size=1, max_wait_ms=0, key=KEY)
    try:
        add_service(portal, "echo", rep)
        direct = lambda: Client(rep.host, rep.port, "/service", key=KEY)  # noqa: E731
        routed = lambda: Client("127.0.0.1", portal.router_port, "/service/echo", portal.token)  # noqa: E731
        front = lambda: Client("127.0.0.1", portal.front_port, "/service/echo", portal.token)  # noqa: E731
        d_lat, r_lat, f_lat = sequential(direct, n), sequential(routed, n), sequential(front, n)
        d_tp, d_bad = throughput(direct, 8, seconds)
        router, front_router, nginx = portal.router.pid, portal.front_router.pid, portal.nginx.pid
        c0 = cpu_seconds(router)
        r_tp, r_bad = throughput(routed, 8, seconds)
        r_cpu = (cpu_seconds(router) - c0) / (r_tp * seconds)
        c0 = cpu_seconds(front_router), cpu_seconds(nginx)
        f_tp, f_bad = throughput(front, 8, seconds)
        f_cpu = ((cpu_seconds(front_router) - c0[0]) / (f_tp * seconds), (cpu_seconds(nginx) - c0[1]) / (f_tp * seconds))
        print("1. router overhead (toy model, batch size 1; %d sequential requests, then 8 clients for %.0fs)"
              % (n, seconds))
        for label, lat, tp, bad in (("direct to the replica", d_lat, d_tp, d_bad),
                                    ("aiportal router", r_lat, r_tp, r_bad),
                                    ("nginx + router (deployed)", f_lat, f_tp, f_bad)):
            print("  %-27s p50 %6.2f ms  p99 %6.2f ms  %7.0f req/s  (%d failed)"
                  % (label, pct(lat, 50), pct(lat, 99), tp, bad))
        print("  CPU per request: router %.0f us; behind nginx: router %.0f us + nginx %.0f us"
              % (r_cpu * 1e6, f_cpu[0] * 1e6, f_cpu[1] * 1e6))
        for label, lat, tp in (("router", r_lat, r_tp), ("nginx + router", f_lat, f_tp)):
            added = statistics.median(lat) * 1000 - statistics.median(d_lat) * 1000
            print("  %s: added p50 %.2f ms (target < 1 ms: %s); throughput %.2fx direct (target >= 0.9x: %s)"
                  % (label, added, "met" if added < 1 else "NOT met", tp / d_tp, "met" if tp / d_tp >= 0.9 else
                     "NOT met"))
        # the deployment's shape: the portal host (nginx + router) has cores of its own, apart
        # from the inference node (replica) and the clients; here: CPU 0 against CPU 1
        if len(os.sched_getaffinity(0)) >= 2:
            portal_side = [p for pid in (front_router, nginx) for p in with_children(pid)]
            every = os.sched_getaffinity(0)
            try:
                for pid in [rep.proc.pid] + threads_of(os.getpid()):
                    os.sched_setaffinity(pid, {1})
                for pid in portal_side:
                    os.sched_setaffinity(pid, {0})
                pd_tp, _ = throughput(direct, 8, seconds)
                pf_tp, pf_bad = throughput(front, 8, seconds)
            finally:
                for pid in [rep.proc.pid] + threads_of(os.getpid()) + portal_side:
                    try:
                        os.sched_setaffinity(pid, every)
                    except OSError:
                        pass
            print("  pinned like a deployment (clients + replica on CPU 1, nginx + router on CPU 0): direct %.0f "
                  "req/s, nginx + router %.0f req/s = %.2fx (target >= 0.9x: %s; %d failed)"
                  % (pd_tp, pf_tp, pf_tp / pd_tp, "met" if pf_tp / pd_tp >= 0.9 else "NOT met", pf_bad))
    finally:
        stop_runtime(rep)
        _clear(portal)


def part_router_model(portal: Portal, tmp: Path, seconds: float) -> None:
    """Throughput direct and through the router for a model that does some work per call."""
    rep = start_runtime(tmp / "fixed-router", class_name="FixedCost", max_batch_size=32, max_wait_ms=5, key=KEY,
                        env={"COST_MS": "20", "PER_ITEM_MS": "0.2"})
    try:
        add_service(portal, "fixed", rep)
        time.sleep(1.0)       # the routing table is re-read every router_refresh_s
        d_tp, d_bad = throughput(lambda: Client(rep.host, rep.port, "/service", key=KEY), 32, seconds,
                                 body=b"x" * 1024)
        r_tp, r_bad = throughput(lambda: Client("127.0.0.1", portal.router_port, "/service/fixed", portal.token), 32,
                                 seconds, body=b"x" * 1024)
        f_tp, f_bad = throughput(lambda: Client("127.0.0.1", portal.front_port, "/service/fixed", portal.token), 32,
                                 seconds, body=b"x" * 1024)
        print("  FixedCost model (20 ms per call, batches up to 32), 32 clients: direct %.0f req/s; router %.0f req/s "
              "= %.2fx; nginx + router %.0f req/s = %.2fx (%d/%d/%d failed)"
              % (d_tp, r_tp, r_tp / d_tp, f_tp, f_tp / d_tp, d_bad, r_bad, f_bad))
    finally:
        stop_runtime(rep)
        _clear(portal)


def _clear(portal: Portal) -> None:
    from sqlmodel import select
    with Session(portal.engine) as db:
        for r in db.exec(select(ServiceReplica)):
            db.delete(r)
        db.flush()
        for s in db.exec(select(Service)):
            db.delete(s)
        db.commit()


def part_batching(tmp: Path, seconds: float) -> None:
    env = {"COST_MS": "20", "PER_ITEM_MS": "0.2"}
    out = {}
    for size in (1, 32):
        rep = start_runtime(tmp / ("fixed-%d" % size), class_name="FixedCost", max_batch_size=size, max_wait_ms=5,
                            env=env)
        try:
            tp, bad = throughput(lambda: Client(rep.host, rep.port, "/service"), 32, seconds, body=b"x" * 1024)
            stats = json.loads(urllib.request.urlopen(rep.url + "/stats").read())
            out[size] = tp
            print("  max batch size %2d: %7.0f req/s, mean batch %.1f (%d failed)"
                  % (size, tp, stats["items_total"] / max(1, stats["batches_total"]), bad))
        finally:
            stop_runtime(rep)
    print("  gain %.1fx (target >= 3x: %s)" % (out[32] / out[1], "met" if out[32] / out[1] >= 3 else "NOT met"))


def part_rollout(portal: Portal, clients: int) -> None:
    sifs = sorted(BASE_IMAGE_DIR.glob("debian-python-*.sif"))
    assert sifs, "no base image in %s: run the test suite once (fixture base_image)" % BASE_IMAGE_DIR
    pw = pwd.getpwnam("alice")
    root = Path("/srv/aiportal/shared/users/alice/bench-svc-%s" % uuid.uuid4().hex[:6])
    models = {}
    for v in ("1", "2"):
        d = root / v
        shutil.copytree(TOY, d, ignore=shutil.ignore_patterns("__pycache__"))
        (d / "VERSION").write_text(v)
        models[v] = str(d)
    for dirpath, _, files in os.walk(root):
        for p in [dirpath] + [os.path.join(dirpath, f) for f in files]:
            os.chown(p, pw.pw_uid, pw.pw_gid)
    portal.start_reconciler()
    name = "bench-%s" % uuid.uuid4().hex[:6]
    jobs: set[str] = set()
    try:
        portal.api("POST", "/services", {"name": name, "image": str(sifs[-1]), "model": models["1"], "replicas": 2})

        def show():
            svc = portal.api("GET", "/services/%s" % name)
            jobs.update(r["slurm_job_id"] for r in svc["replicas"] if r["slurm_job_id"])
            return svc
        deadline = time.monotonic() + 120
        while show()["ready_replicas"] < 2:
            assert time.monotonic() < deadline, show()
            time.sleep(0.5)
        # the API says READY at once; the router sees it within router_refresh_s: start the
        # load once the router itself routes (the rollout's failures are what is counted)
        probe = Client("127.0.0.1", portal.router_port, "/service/%s" % name, portal.token)
        while probe.post(b"ready?")[0] != 200:
            assert time.monotonic() < deadline, probe.last
            time.sleep(0.1)
        results, failures, stop = [], [], threading.Event()

        def load():
            c = Client("127.0.0.1", portal.router_port, "/service/%s" % name, portal.token)
            while not stop.is_set():
                try:
                    status = c.post(b"roll")[0]
                    results.append(status)
                    if status != 200 and len(failures) < 5:
                        failures.append((status, c.last[:300]))
                except OSError:
                    results.append(0)
                    c = Client("127.0.0.1", portal.router_port, "/service/%s" % name, portal.token)
        threads = [threading.Thread(target=load) for _ in range(clients)]
        for t in threads:
            t.start()
        time.sleep(2)
        t0 = time.monotonic()
        portal.api("POST", "/services/%s/update" % name, {"model": models["2"], "version": "2"})
        while True:
            svc = show()
            if svc["state"] == "RUNNING" and svc["generation"] == 2 and len(
                    [r for r in svc["replicas"] if r["phase"] != "ENDED"]) == 2 and svc["ready_replicas"] == 2:
                break
            assert time.monotonic() - t0 < 180, svc
            time.sleep(0.3)
        took = time.monotonic() - t0
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join()
        failed = len([s for s in results if s != 200])
        print("3. rolling update of 2 replicas (dev cluster, base image, toy model) under %d clients:" % clients)
        for status, body in failures:
            print("  failed: %s %r" % (status, body))
        print("  %d requests, %d failed; rollout took %.1fs (target 0 failed: %s)"
              % (len(results), failed, took, "met" if failed == 0 else "NOT met"))
    finally:
        try:
            portal.api("DELETE", "/services/%s" % name)
            time.sleep(5)
        except OSError:
            pass
        if jobs:
            subprocess.run(["scancel", *sorted(jobs)], capture_output=True, timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=4, help="part 3: clients during the rolling update")
    ap.add_argument("--skip-cluster", action="store_true", help="parts 1-2 only")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    portal = Portal(tmp)
    try:
        part_router(portal, tmp, args.requests, args.seconds)
        part_router_model(portal, tmp, args.seconds)
        print("2. batching (FixedCost: 20 ms per call + 0.2 ms per item), 32 clients for %.0fs:" % args.seconds)
        part_batching(tmp, args.seconds)
        if not args.skip_cluster:
            part_rollout(portal, args.clients)
    finally:
        portal.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

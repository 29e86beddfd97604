"""CIFAR-10 training: throughput inside Apptainer against the same program on the host, and the
time from submit to the first training step, broken down (needs `make run`; run as root).

    .venv/bin/python bench/bench_cifar10.py [--rounds 3] [--steps 300] [--submits 3] [--cold-image]

1. Throughput. ``examples/cifar10/train.py`` on the same synthetic dataset (5 training files,
   prepare_data.py) with the same arguments (batch 128, ``--max_steps STEPS``, no checkpoints
   or evaluation in the way), alternately (a) ``apptainer exec`` of the TensorFlow image
   (containers/definitions/tensorflow.def, through the SIF cache) and (b) directly on the host
   with the same TensorFlow from PyPI in a throwaway venv (``--host-venv``, default
   /var/tmp/aiportal-bench-tf, created when missing; not the repo's .venv). Each run reports
   its mean examples/sec over the log intervals after the first (which holds tracing) and the
   CPU it used (per 1,000 examples in training, and for the whole run with apptainer's own
   processes and the start; other load on the machine disturbs CPU time far less than wall time); ``--rounds`` pairs, the order swapped every round; the ratio of
   the medians is the score (target: container/host >= 0.97).
2. Submit to first step. A portal of its own (gunicorn, as bench_api_submit.py starts it),
   alice's data source for a fresh bucket holding the dataset and the code (uploaded by
   prepare_data.py), then ``--submits`` jobs on gpu-1card through ``POST /api/v1/jobs``, one at a
   time. The job's log is read as it grows (every 10 ms, as root) and each marker stamped when
   it appears: POST answered -> batch script's first line (queue: scheduling and launch) ->
   ``run:`` (stage-in: inputs and the restore of earlier outputs) -> train.py's first line
   (container start: apptainer and Python) -> ``starting at step 0`` (TensorFlow import and
   model build) -> ``step 1, loss`` (input pipeline, tracing, the first step). The image is
   cached, so the submission resolves it in the POST; ``--cold-image`` also times a conversion
   of tensorflow.def into a scratch cache (what a first use costs).
Everything it makes is removed at the end (jobs cancelled by id, bucket, job folders, portal).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_api_submit import free_port, start_portal, stop  # noqa: E402

from containers.cache import SifCache  # noqa: E402
from containers.refs import parse_image_ref  # noqa: E402
from portal.cli import _api  # noqa: E402
from portal.settings import Settings  # noqa: E402
from storage.credentials import DataSource  # noqa: E402
from storage.s3 import S3Store  # noqa: E402

EXAMPLE = ROOT / "examples" / "cifar10"
DEFINITION = ROOT / "containers" / "definitions" / "tensorflow.def"
ADMIN_S3 = Path("/etc/aiportal/s3-admin.json")
USER = "alice"
MARKERS = [  # (phase that ends when the line appears, pattern)
    ("queue", re.compile(r"\[aiportal [^\]]*\] stage in: ")),
    ("stage-in", re.compile(r"\[aiportal [^\]]*\] run: ")),
    ("container start", re.compile(r"train\.py started \(pid")),
    ("TF import + setup", re.compile(r"starting at step 0")),
    ("first step", re.compile(r"step 1, loss = ")),
]


def tf_package() -> str:
    """The TF_PACKAGE default of the definition's %arguments (the host gets the same wheel)."""
    m = re.search(r"^\s*TF_PACKAGE=(\S+)", DEFINITION.read_text(), re.M)
    return m.group(1) if m else "tensorflow-cpu"


def host_venv(path: Path) -> Path:
    python = path / "bin" / "python"
    want = tf_package()
    if python.exists():
        have = subprocess.run([str(python), "-m", "pip", "show", "tensorflow-cpu"], capture_output=True, text=True)
        if "Version: %s" % want.split("==")[-1] in have.stdout:
            return python
    print("creating %s with %s (~30 s)" % (path, want), file=sys.stderr)
    subprocess.run(["python3", "-m", "venv", str(path)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", want], check=True, timeout=1800)
    return python


def train_argv(data: Path, out: Path, steps: int) -> list[str]:
    return ["--data_dir", str(data), "--output_dir", str(out), "--max_steps", str(steps), "--batch_size", "128",
            "--log_every", "20", "--checkpoint_every", "1000000", "--eval_examples", "0"]


def one_run(kind: str, sif: Path, python: Path, data: Path, work: Path, steps: int) -> tuple[float, float, float]:
    """Mean examples/sec and CPU seconds per 1,000 examples after the first log interval (the
    program's own figures), and the CPU seconds of the whole run (all processes, startup included)."""
    out = work / ("out-%s-%d" % (kind, time.monotonic_ns()))
    out.mkdir()
    if kind == "apptainer":
        argv = ["apptainer", "exec", "--no-mount", "cwd", "--bind", "%s:/code" % EXAMPLE, "--bind", "%s:/data/data" % data,
                "--bind", "%s:/data/output" % out, str(sif), "python3", "/code/train.py",
                *train_argv(Path("/data/data"), Path("/data/output"), steps)]
    else:
        argv = [str(python), str(EXAMPLE / "train.py"), *train_argv(data, out, steps)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run(argv, capture_output=True, text=True, timeout=1800, cwd="/")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if res.returncode != 0:
        raise SystemExit("%s run failed (%d):\n%s" % (kind, res.returncode, (res.stdout + res.stderr)[-3000:]))
    metrics = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return metrics["examples_per_sec"], metrics["cpu_seconds_per_1000_examples"], cpu


def throughput(sif: Path, python: Path, data: Path, work: Path, rounds: int, steps: int) -> None:
    rates: dict[str, list[float]] = {"apptainer": [], "host": []}
    cpus: dict[str, list[float]] = {"apptainer": [], "host": []}
    per_k: dict[str, list[float]] = {"apptainer": [], "host": []}
    for i in range(rounds):
        order = ["host", "apptainer"] if i % 2 == 0 else ["apptainer", "host"]
        for kind in order:
            rate, cpu_k, cpu = one_run(kind, sif, python, data, work, steps)
            rates[kind].append(rate)
            per_k[kind].append(cpu_k)
            cpus[kind].append(cpu)
            print("  round %d %-9s %7.1f examples/sec  %.3f CPU s/1000 examples  %5.1f CPU s in all (load %.1f)"
                  % (i + 1, kind, rate, cpu_k, cpu, os.getloadavg()[0]), flush=True)
    c, h = statistics.median(rates["apptainer"]), statistics.median(rates["host"])
    pairs = statistics.median(a / b for a, b in zip(rates["apptainer"], rates["host"]))
    print("throughput, %d rounds of %d steps (batch 128, load %.1f): apptainer median %.1f examples/sec, "
          "host median %.1f; ratio of medians %.3f, median of per-round ratios %.3f (target >= 0.97: %s)"
          % (rounds, steps, os.getloadavg()[0], c, h, c / h, pairs, "met" if c / h >= 0.97 else "NOT met"))
    kc, kh = statistics.median(per_k["apptainer"]), statistics.median(per_k["host"])
    cc, ch = statistics.median(cpus["apptainer"]), statistics.median(cpus["host"])
    print("CPU cost (the same work, whatever else runs): training %.3f s/1000 examples in apptainer, %.3f on the "
          "host, host/apptainer %.3f; whole runs %.1f s and %.1f s, host/apptainer %.3f"
          % (kc, kh, kh / kc, cc, ch, ch / cc))


class LogWatch:
    """Stamps the time each marker first appears in a growing log (polled every 10 ms)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.buf = b""
        self.seen: dict[str, float] = {}

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        now = time.time()
        self.offset += len(data)
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            for name, pattern in MARKERS:
                if name not in self.seen and pattern.search(text):
                    self.seen[name] = now


def submit_to_first_step(sif: Path, data_root: Path, submits: int, prepare) -> None:
    creds = json.loads(ADMIN_S3.read_text())
    src = DataSource(name="bench", endpoint=creds["endpoint"], region=creds["region"],
                     access_key=creds["access_key"], secret_key=creds["secret_key"])
    bucket = "bench-cifar10-%s" % uuid.uuid4().hex[:10]
    with S3Store(src) as s:
        s.client.create_bucket(Bucket=bucket)
    base = Path(tempfile.mkdtemp(prefix="bench-cifar10-"))
    os.chmod(base, 0o755)
    proc = None
    slurm_ids: list[str] = []
    job_dirs: list[Path] = []
    try:
        rc = prepare.main(["--synthetic", "--dest", str(data_root / "upload"), "--train-files", "5",
                           "--upload", "s3://%s/cifar10/data" % bucket, "--upload-code", "s3://%s/cifar10/code" % bucket,
                           "--credentials", str(ADMIN_S3), "--aiportal", "/opt/aiportal/venv/bin/aiportal"])
        if rc != 0:
            raise SystemExit("prepare_data.py failed")
        with S3Store(src) as s:
            size = sum(o.size for o in s.list(bucket, "cifar10/"))
        port = free_port(9103)
        proc, token, settings = start_portal(base, port)
        (base / "token").write_text(token)
        cli = argparse.Namespace(url="http://127.0.0.1:%d" % port, token_file=str(base / "token"), timeout=60.0)
        _api(cli, "POST", "/datasources", {"name": "bench", "endpoint": creds["endpoint"], "region": creds["region"],
                                           "access_key": creds["access_key"], "secret_key": creds["secret_key"],
                                           "buckets": [bucket]})
        phases: dict[str, list[float]] = {name: [] for name in ["submit (POST)"] + [m[0] for m in MARKERS]}
        totals = []
        for i in range(submits):
            body = {"image": str(sif), "node_type": "1card", "name": "bench-cifar10", "time_limit": "00:10:00",
                    "command": ["python3", "/data/data/train.py", "--max_steps", "5", "--batch_size", "128",
                                "--log_every", "1", "--eval_examples", "0"],
                    "inputs": ["s3://%s/cifar10/data" % bucket, "s3://%s/cifar10/code" % bucket],
                    "output": "s3://%s/runs/%d" % (bucket, i)}
            t0 = time.time()
            job = _api(cli, "POST", "/jobs", body)
            t_post = time.time()
            slurm_ids.append(job["slurm_job_id"])
            job_dir = Path(settings.shared_root) / "users" / USER / "jobs" / job["id"]
            job_dirs.append(job_dir)
            watch = LogWatch(job_dir / "logs" / ("slurm-%s.out" % job["slurm_job_id"]))
            deadline = time.monotonic() + 180
            while len(watch.seen) < len(MARKERS):
                if time.monotonic() > deadline:
                    raise SystemExit("job %s: markers seen %s after 180 s; log %s:\n%s"
                                     % (job["slurm_job_id"], sorted(watch.seen), watch.path,
                                        watch.path.read_text(errors="replace")[-3000:]))
                watch.poll()
                time.sleep(0.01)
            stamps = [t0, t_post] + [watch.seen[name] for name, _ in MARKERS]
            for name, a, b in zip(phases, stamps, stamps[1:]):
                phases[name].append(b - a)
            totals.append(stamps[-1] - t0)
            print("  submit %d: %s; total %.2f s" % (i + 1, ", ".join("%s %.2f s" % (n, v[-1]) for n, v in phases.items()),
                                                     totals[-1]), flush=True)
            subprocess.run(["scancel", job["slurm_job_id"]], capture_output=True, timeout=60)
            _wait_gone([job["slurm_job_id"]])
        print("submit to first training step, %d jobs on gpu-1card (dataset %.0f MB staged in from S3, image cached), "
              "medians:" % (submits, size / 1e6))
        for name, values in phases.items():
            print("  %-18s %6.2f s" % (name, statistics.median(values)))
        print("  %-18s %6.2f s" % ("total", statistics.median(totals)))
    finally:
        if proc is not None:
            stop(proc)
        if slurm_ids:
            subprocess.run(["scancel", *slurm_ids], capture_output=True, timeout=120)
            _wait_gone(slurm_ids)
        for d in job_dirs:
            shutil.rmtree(d, ignore_errors=True)
        with S3Store(src) as s:
            keys = [o.key for o in s.list(bucket, "")]
            for i in range(0, len(keys), 1000):
                s.client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]]})
            s.client.delete_bucket(Bucket=bucket)
        shutil.rmtree(base, ignore_errors=True)


def _wait_gone(ids: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True,
                              timeout=30).stdout.split()
        if not left:
            return
        time.sleep(0.5)


def cold_image(settings: Settings, work: Path) -> None:
    scratch = work / "scratch-cache"
    t0 = time.monotonic()
    SifCache(scratch, build_timeout=1800).ensure(parse_image_ref(str(DEFINITION)))
    print("image, cold: tensorflow.def converted through a scratch SIF cache in %.1f s "
          "(cached: resolved inside the POST above)" % (time.monotonic() - t0))
    shutil.rmtree(scratch, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="host/apptainer pairs (default 3)")
    ap.add_argument("--steps", type=int, default=300, help="steps per throughput run (default 300)")
    ap.add_argument("--submits", type=int, default=3, help="jobs for the submit-to-first-step part (default 3)")
    ap.add_argument("--host-venv", type=Path, default=Path("/var/tmp/aiportal-bench-tf"))
    ap.add_argument("--cold-image", action="store_true", help="also time a conversion of tensorflow.def")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-submit", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (it runs apptainer, reads alice's job logs and starts a portal)")
    sys.path.insert(0, str(EXAMPLE))
    import prepare_data
    settings = Settings.load(require_secrets=False)
    sif = SifCache(Path(settings.image_cache), build_timeout=1800).ensure(parse_image_ref(str(DEFINITION)))
    print("image %s (%.0f MB); load %.1f" % (sif, sif.stat().st_size / 1e6, os.getloadavg()[0]), flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-cifar10-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    try:
        if not args.skip_throughput:
            python = host_venv(args.host_venv)
            prepare_data.write_synthetic(work / "data", seed=0, train_files=5)
            throughput(sif, python, work / "data", work, args.rounds, args.steps)
        if not args.skip_submit:
            submit_to_first_step(sif, work, args.submits, prepare_data)
        if args.cold_image:
            cold_image(settings, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

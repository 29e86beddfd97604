"""Batching with the CIFAR-10 model: ``Cifar10Classifier`` (examples/cifar10/model.py) served by
the real serving runtime (inference/runtime.py) inside the TensorFlow image, max batch size 1
against 32 (run as root; no Slurm and no portal needed):

    .venv/bin/python bench/bench_cifar_serving.py [--seconds 10] [--clients 32] [--rounds 2] [--model-dir DIR]

1. The model: without ``--model-dir`` (a folder with model.py and model.keras), train.py runs
   ``--steps`` steps (30) on the synthetic dataset in the image (the weights do not change the
   cost of a prediction); one test image is encoded as PNG in the image.
2. For each max batch size (``--rounds`` times, the order swapped every round): the runtime is
   started with ``apptainer exec`` of the TensorFlow image (containers/definitions/tensorflow.def,
   through the SIF cache) on a loopback port of 9150-9199, as a replica job starts it minus
   Slurm (the command is printed); 2 s of warm-up; p50/p95 latency of ``--latency-requests``
   sequential requests (concurrency 1, one keep-alive connection); then ``--clients`` clients,
   each on its own keep-alive connection, send the same PNG for ``--seconds`` seconds: req/s,
   the mean batch size from the runtime's ``/stats`` (the counters' difference over that
   window), CPU time per request of the runtime process (from /proc) and of the load generator
   (this process; what other load on the machine disturbs least) and failures (not 200,
   connection errors, or a label other than the sequential requests got). The runtime is
   stopped by pid (SIGTERM to apptainer, which passes it on).
3. The gain: median req/s at 32 over median req/s at 1 (target >= 3x).

The load generator and the runtime share the machine's cores; everything runs on the CPU
(tensorflow-cpu; the dev cluster's GPUs are device files without a driver).
"""
from __future__ import annotations

import argparse
import http.client
import os
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from containers.cache import SifCache  # noqa: E402
from containers.refs import parse_image_ref  # noqa: E402
from portal.settings import Settings  # noqa: E402
from tests.examples import cifar_serving as serving  # noqa: E402
from tests.examples.conftest import TF_DEFINITION, load_example  # noqa: E402

BATCH_SIZES = (1, 32)


class Client:
    """One keep-alive connection to the runtime's /service; reconnects after an error."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)

    def post(self, body: bytes) -> tuple[int, bytes, float]:
        t0 = time.perf_counter()
        try:
            self.conn.request("POST", "/service", body=body, headers={"Content-Type": "image/png"})
            resp = self.conn.getresponse()
            out = resp.read()
            return resp.status, out, time.perf_counter() - t0
        except (OSError, http.client.HTTPException) as e:
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
            return 0, str(e).encode(), time.perf_counter() - t0

    def close(self) -> None:
        self.conn.close()


def sequential(url: str, body: bytes, n: int) -> tuple[list[float], bytes]:
    """Latencies of ``n`` requests one after another, and the answer (all must agree)."""
    c = Client(url)
    try:
        status, want, _ = c.post(body)
        assert status == 200, (status, want)
        out = []
        for _ in range(n):
            status, got, dt = c.post(body)
            assert status == 200 and got == want, (status, got, want)
            out.append(dt)
        return out, want
    finally:
        c.close()


def load(url: str, body: bytes, want: bytes, clients: int, seconds: float) -> tuple[int, int, float]:
    """``clients`` threads sending ``body`` until ``seconds`` have passed: (answered, failed, wall s)."""
    done, failed = [0], [0]
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def run():
        c = Client(url)
        n = bad = 0
        start.wait()
        while time.monotonic() < stop_at[0]:
            status, got, _ = c.post(body)
            n += 1
            bad += status != 200 or got != want
        c.close()
        with lock:
            done[0] += n
            failed[0] += bad
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    return done[0], failed[0], time.monotonic() - t0


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000


@dataclass
class Run:
    rate: float             #: req/s under load
    mean_batch: float
    failed: int
    requests: int
    cpu_ms: float           #: the runtime's CPU time per request under load
    client_cpu_ms: float    #: the load generator's (this process's) CPU time per request
    p50: float              #: ms, concurrency 1
    p95: float
    answer: str
    load: float

    @staticmethod
    def median(runs: list["Run"]) -> "Run":
        numbers = ("rate", "mean_batch", "failed", "requests", "cpu_ms", "client_cpu_ms", "p50", "p95")
        return Run(*(statistics.median(getattr(r, f) for r in runs) for f in numbers),
                   runs[0].answer, statistics.median(r.load for r in runs))


def measure(image: Path, model: Path, run_dir: Path, body: bytes, size: int, args, show_command: bool) -> Run:
    """One runtime in the image with max batch size ``size``: warm-up, latency, load; stopped by pid."""
    t0 = time.monotonic()
    rt = serving.start_runtime_in_image(image, model, run_dir, max_batch_size=size, max_wait_ms=args.max_wait_ms)
    try:
        if show_command:
            print("  runtime (ready in %.1f s): %s\n    runtime.json: %s"
                  % (time.monotonic() - t0, shlex.join(rt.argv), (run_dir / "runtime.json").read_text()))
        load(rt.url, body, sequential(rt.url, body, 5)[1], args.clients, 2.0)       # warm-up
        lat, want = sequential(rt.url, body, args.latency_requests)
        before, cpu0, own0 = rt.stats(), rt.cpu_seconds(), own_cpu_seconds()
        n, bad, wall = load(rt.url, body, want, args.clients, args.seconds)
        after, cpu1, own1 = rt.stats(), rt.cpu_seconds(), own_cpu_seconds()
    finally:
        serving.stop_runtime(rt)
    assert rt.proc.returncode == 0, "runtime exited %s:\n%s" % (rt.proc.returncode, rt.log.read_text()[-3000:])
    batches = after["batches_total"] - before["batches_total"]
    items = after["items_total"] - before["items_total"]
    return Run(n / wall, items / max(1, batches), bad, n, (cpu1 - cpu0) * 1000 / max(1, n),
               (own1 - own0) * 1000 / max(1, n), pct(lat, 50), pct(lat, 95), want.decode(errors="replace"),
               os.getloadavg()[0])


#: the model alone, in the image: items/s of execute() one item per call against 32 per call
MODEL_ALONE = r"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("m", "/model/model.py")
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
import os; os.chdir("/model")
model = m.Cifar10Classifier(); model.load_model()
body = open("/input.png", "rb").read()
for size in (1, 32):
    model.execute([body] * size, size)                       # warm-up
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < float(sys.argv[1]):
        model.execute([body] * size, size)
        n += size
    print("%d %.1f %.3f" % (size, n / (time.perf_counter() - t0), (time.process_time() - c0) * 1000 / n))
"""


def model_alone(image: Path, model: Path, png: Path, seconds: float) -> dict[int, tuple[float, float]]:
    """(items/s, CPU ms per item) of the model class's execute() with 1 and 32 items per call,
    no HTTP: the ceiling of any batching gain on this hardware."""
    out = serving._run(serving.apptainer_exec(image, {"/model": model, "/input.png": png}, "python3", "-c",
                                              MODEL_ALONE, str(seconds)), timeout=600)
    return {int(a): (float(b), float(c)) for a, b, c in (line.split() for line in out.splitlines() if line.strip())}


def own_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def tf_image() -> Path:
    """The TensorFlow SIF through the image cache (built once per definition digest, ~70 s)."""
    settings = Settings.load(require_secrets=False)
    return SifCache(Path(settings.image_cache), build_timeout=900).ensure(parse_image_ref(str(TF_DEFINITION)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="load per batch size (default 10)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--latency-requests", type=int, default=200, help="sequential requests for p50 (default 200)")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="the runtime's max_wait_ms (default 5, as services)")
    ap.add_argument("--model-dir", type=Path, help="a folder with model.py and model.keras (default: train one)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each batch size, order swapped (default 2)")
    ap.add_argument("--steps", type=int, default=30, help="training steps when no --model-dir (default 30)")
    args = ap.parse_args()
    print("command: %s" % shlex.join([sys.executable, *sys.argv]))
    image = tf_image()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cifar-serving-", dir="/var/tmp"))
    try:
        dataset = tmp / "data"
        load_example("prepare_data").write_synthetic(dataset, seed=0, train_files=1)
        model = args.model_dir
        if model is None:
            t0 = time.monotonic()
            model = serving.model_folder(serving.train(image, dataset, tmp / "train", steps=args.steps), tmp / "model")
            print("model: train.py --max_steps %d in the image (%.1f s) -> %s" % (args.steps, time.monotonic() - t0,
                                                                                   model))
        png = serving.encode_images(image, dataset, tmp / "images", count=1)[0].png
        body = png.read_bytes()
        print("image: %s; input: %s (%d bytes); %d CPUs, load %.1f"
              % (image, png.name, len(body), os.cpu_count(), os.getloadavg()[0]))
        print("%d clients for %.0f s per max batch size (max_wait_ms %g), %d round(s), the order swapped every round; "
              "p50/p95 over %d sequential requests:"
              % (args.clients, args.seconds, args.max_wait_ms, args.rounds, args.latency_requests))
        runs: dict[int, list[Run]] = {size: [] for size in BATCH_SIZES}
        for r in range(args.rounds):
            for size in (BATCH_SIZES if r % 2 == 0 else BATCH_SIZES[::-1]):
                run = measure(image, model, tmp / ("run-%d-%d" % (r, size)), body, size, args, show_command=r == 0)
                runs[size].append(run)
                print("  round %d, max batch size %2d: %7.1f req/s, mean batch %5.1f, %d failed of %d, CPU per "
                      "request %.2f ms runtime + %.2f ms clients; concurrency 1: p50 %.1f ms, p95 %.1f ms (answer %s); "
                      "load %.1f"
                      % (r + 1, size, run.rate, run.mean_batch, run.failed, run.requests, run.cpu_ms, run.client_cpu_ms,
                         run.p50, run.p95, run.answer, run.load))
        med = {size: Run.median(rs) for size, rs in runs.items()}
        lo, hi = BATCH_SIZES
        for size in BATCH_SIZES:
            m = med[size]
            print("max batch size %2d (median of %d): %7.1f req/s, mean batch %5.1f, %d failed, CPU per request "
                  "%.2f ms runtime + %.2f ms clients, p50 %.1f ms at concurrency 1"
                  % (size, len(runs[size]), m.rate, m.mean_batch, sum(r.failed for r in runs[size]), m.cpu_ms,
                     m.client_cpu_ms, m.p50))
        gain = med[hi].rate / med[lo].rate
        print("gain %.1fx req/s (target >= 3x: %s); runtime CPU per request %.1fx lower; load %.1f at the end"
              % (gain, "met" if gain >= 3 else "NOT met", med[lo].cpu_ms / med[hi].cpu_ms, os.getloadavg()[0]))
        alone = model_alone(image, model, png, min(args.seconds, 5.0))
        print("the model alone (execute() in the image, no HTTP, %g s each): %.0f images/s (%.2f ms CPU each) one per "
              "call, %.0f images/s (%.2f ms CPU each) 32 per call: %.1fx, the ceiling of batching's gain here"
              % (min(args.seconds, 5.0), alone[1][0], alone[1][1], alone[32][0], alone[32][1],
                 alone[32][0] / alone[1][0]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

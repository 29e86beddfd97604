"""The CIFAR-10 model as the inference tier serves it, for tests and benchmarks (host side; TensorFlow
exists only in the image, so every step that needs it runs there with ``apptainer exec``):

* :func:`train` -- ``examples/cifar10/train.py`` for a few steps in the TensorFlow image;
* :func:`model_folder` -- the folder a service deploys: ``model.py`` and ``model.keras`` side by
  side (``Cifar10Classifier()`` finds the model beside its file);
* :func:`encode_images` -- test-set images as PNG and JPEG files (``encode_images.py`` in the image);
* :func:`start_runtime_in_image` -- ``inference/runtime.py`` serving the model class inside the
  image, on a loopback port of 9150-9199, as a replica job runs it (without Slurm).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from inference.endpoints import read_endpoint
from tests.conftest import REPO, stop_process
from tests.examples.conftest import CHECKS, EXAMPLE

RUNTIME = REPO / "inference" / "runtime.py"
MODEL_CLASS = "Cifar10Classifier"
#: DESIGN.md: tests' extra instances use 9100-9199 (the live portal takes 9110-9149)
RUNTIME_PORTS = [9150, 9199]


def apptainer_exec(image: Path, binds: dict[str, Path], *command: str) -> list[str]:
    """argv of ``apptainer exec`` with ``binds`` (container path -> host path) and the host's
    working directory left out of the container."""
    argv = ["apptainer", "exec", "--no-mount", "cwd"]
    for dest, src in binds.items():
        argv += ["--bind", "%s:%s" % (src, dest)]
    return argv + [str(image), *command]


def _run(argv: list[str], timeout: float) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/", check=False)
    if res.returncode != 0:
        raise AssertionError("%s exited %d\nstdout: %s\nstderr: %s"
                             % (argv, res.returncode, res.stdout[-3000:], res.stderr[-3000:]))
    return res.stdout


def train(image: Path, dataset: Path, out: Path, steps: int = 30, batch_size: int = 32) -> Path:
    """Train for ``steps`` steps on ``dataset`` (a folder with cifar-10-batches-bin/) into
    ``out``; returns the saved ``model.keras``. ~10 s with 30 steps on 2 cores."""
    out.mkdir(parents=True, exist_ok=True)
    _run(apptainer_exec(image, {"/code": EXAMPLE, "/data/data": dataset, "/data/output": out},
                        "python3", "/code/train.py", "--max_steps", str(steps), "--batch_size", str(batch_size),
                        "--log_every", "10", "--checkpoint_every", "100000", "--eval_examples", "0"), timeout=600)
    model = out / "model" / "model.keras"
    assert model.is_file(), "train.py ended without %s" % model
    return model


def model_folder(model_file: Path, dest: Path) -> Path:
    """``dest`` with ``model.py`` (the class) and ``model.keras`` (the weights): what a service's
    ``model`` location holds; deploy with ``class_name`` :data:`MODEL_CLASS`."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLE / "model.py", dest / "model.py")
    shutil.copy(model_file, dest / "model.keras")
    return dest


@dataclass(frozen=True)
class SampleImage:
    label: str              #: the true class (the model need not agree after a few steps)
    png: Path
    jpeg: Path


def encode_images(image: Path, dataset: Path, dest: Path, count: int = 4) -> list[SampleImage]:
    """The first ``count`` images of the dataset's test file as PNG and JPEG files in ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    out = _run(apptainer_exec(image, {"/code": EXAMPLE, "/checks": CHECKS, "/data": dataset, "/out": dest},
                              "python3", "/checks/encode_images.py", "/data/cifar-10-batches-bin/test_batch.bin",
                              "/out", "--count", str(count)), timeout=300)
    written = json.loads(out.strip().splitlines()[-1])
    return [SampleImage(i["label"], dest / i["png"], dest / i["jpeg"]) for i in written]


@dataclass
class ImageRuntime:
    proc: subprocess.Popen      #: apptainer
    argv: list[str]
    url: str
    pid: int                    #: the runtime's python (no PID namespace: a host pid)
    log: Path

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/stats", timeout=10) as resp:
            return json.loads(resp.read())

    def cpu_seconds(self) -> float:
        """user + system CPU time of the runtime process so far (all its threads)."""
        fields = Path("/proc/%d/stat" % self.pid).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_runtime_in_image(image: Path, model_dir: Path, run_dir: Path, timeout: float = 180, **cfg) -> ImageRuntime:
    """The serving runtime in ``image`` with ``model_dir`` at /aiportal/model and the model
    class :data:`MODEL_CLASS`; returns once /healthz answers 200 (TensorFlow loaded)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_file": "model.py", "class_name": MODEL_CLASS, "model_dir": "/aiportal/model",
              "port_range": RUNTIME_PORTS, "endpoint_file": "/aiportal/run/endpoint.json", "version": "bench",
              "job_id": "local", **cfg}
    (run_dir / "runtime.json").write_text(json.dumps(config))
    argv = apptainer_exec(image, {"/aiportal/runtime.py": RUNTIME, "/aiportal/model": model_dir,
                                  "/aiportal/run": run_dir},
                          "python3", "/aiportal/runtime.py", "--config", "/aiportal/run/runtime.json")
    log = run_dir / "runtime.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd="/")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError("runtime exited %s:\n%s" % (proc.returncode, log.read_text()[-3000:]))
            ep = read_endpoint(run_dir)
            if ep is not None:
                pid = json.loads((run_dir / "endpoint.json").read_text())["pid"]
                rt = ImageRuntime(proc, argv, ep.url, pid, log)
                try:
                    with urllib.request.urlopen(rt.url + "/healthz", timeout=2):
                        return rt
                except urllib.error.HTTPError as e:     # 503 while the model loads
                    e.close()
                except OSError:
                    pass
            time.sleep(0.2)
        raise AssertionError("runtime not ready after %ss:\n%s" % (timeout, log.read_text()[-3000:]))
    except BaseException:
        stop_process(proc)
        raise


def stop_runtime(rt: ImageRuntime) -> None:
    """SIGTERM to apptainer (by pid; it passes the signal on, the runtime drains), SIGKILL after 30 s."""
    stop_process(rt.proc, timeout=30)

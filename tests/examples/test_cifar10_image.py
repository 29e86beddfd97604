"""The CIFAR-10 example inside the TensorFlow image (apptainer exec, no Slurm): signals reach the
program through Apptainer, SIGUSR1 checkpoints and training goes on, SIGTERM checkpoints and
stops (exit 143), the next run resumes from that checkpoint and stops at the total step count;
the inference class then answers for PNG and JPEG bytes with the model it wrote. TensorFlow
exists only in the image: nothing here imports it on the host."""
from __future__ import annotations

import json
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.examples.cifar_serving import apptainer_exec
from tests.examples.conftest import CHECKS, EXAMPLE

pytestmark = [pytest.mark.apptainer]


class Lines:
    """A child's stdout, line by line, with a timeout per wait."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.seen: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        raise AssertionError("no line matching %r in %ss:\n%s" % (pattern, timeout, "\n".join(self.seen[-30:])))

    def rest(self) -> list[str]:
        self.proc.wait(timeout=120)
        while (line := self._q.get(timeout=10)) is not None:
            self.seen.append(line)
        return self.seen


@dataclass
class Runs:
    out: Path
    first: list[str]
    first_rc: int
    usr1_step: int
    term_step: int
    second: list[str]
    second_rc: int
    max_steps: int


@pytest.fixture(scope="module")
def runs(tf_image, cifar_dataset):
    """Run 1 until step 10, SIGUSR1, a few more steps, SIGTERM (to the apptainer process, as the
    batch script forwards them); run 2 with --max_steps = where run 1 stopped + 20."""
    out = Path(tempfile.mkdtemp(prefix="aiportal-cifar10-out-", dir="/var/tmp"))
    binds = {"/code": EXAMPLE, "/data/data": cifar_dataset, "/data/output": out}
    common = ["--batch_size", "32", "--log_every", "5", "--checkpoint_every", "1000", "--eval_examples", "500"]
    proc = subprocess.Popen(apptainer_exec(tf_image, binds, "python3", "/code/train.py", "--max_steps", "100000",
                                           *common),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd="/")
    try:
        lines = Lines(proc)
        lines.wait_for(r"step 10, loss = ")
        proc.send_signal(signal.SIGUSR1)
        usr1 = int(lines.wait_for(r"checkpoint at step (\d+) \(got SIGUSR1\)", timeout=30).group(1))
        lines.wait_for(r"step %d, loss = " % ((usr1 // 5 + 2) * 5), timeout=30)    # still training
        proc.send_signal(signal.SIGTERM)
        first = lines.rest()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
    term = int(re.search(r"checkpoint at step (\d+) \(got SIGTERM, stopping\)", "\n".join(first)).group(1))
    max_steps = term + 20
    res = subprocess.run(apptainer_exec(tf_image, binds, "python3", "/code/train.py", "--max_steps", str(max_steps),
                                        *common),
                         capture_output=True, text=True, timeout=300, cwd="/")
    yield Runs(out, first, proc.returncode, usr1, term, res.stdout.splitlines(), res.returncode, max_steps)
    shutil.rmtree(out, ignore_errors=True)


def test_sigusr1_checkpoints_and_training_goes_on(runs):
    assert runs.usr1_step >= 10
    assert (runs.out / "checkpoints").is_dir()
    later = [int(m.group(1)) for m in (re.search(r"step (\d+), loss", line) for line in runs.first) if m]
    assert max(later) > runs.usr1_step


def test_sigterm_checkpoints_and_stops_with_143(runs):
    assert runs.first_rc == 143, "\n".join(runs.first[-20:])
    assert runs.term_step > runs.usr1_step
    assert any("stopped by SIGTERM at step %d" % runs.term_step in line for line in runs.first)
    assert not any("model saved" in line for line in runs.first)


def test_next_run_resumes_from_the_checkpoint_and_stops_at_the_total(runs):
    log = "\n".join(runs.second)
    assert runs.second_rc == 0, log[-3000:]
    assert "resuming from step %d (checkpoint ckpt-%d)" % (runs.term_step, runs.term_step) in log
    steps = [int(s) for s in re.findall(r"step (\d+), loss = ", log)]
    assert steps[0] > runs.term_step and steps[-1] == runs.max_steps
    metrics = json.loads((runs.out / "metrics.json").read_text())
    assert metrics["state"] == "finished"
    assert (metrics["start_step"], metrics["final_step"], metrics["steps_this_run"]) == (runs.term_step, runs.max_steps, 20)
    assert metrics["test_examples"] == 500 and 0 <= metrics["test_accuracy"] <= 1
    assert (runs.out / "model" / "model.keras").is_file()
    assert (runs.out / "checkpoints" / ("ckpt-%d.index" % runs.max_steps)).is_file()


def test_model_class_answers_for_png_and_jpeg_bytes_in_the_image(runs, tf_image, cifar_dataset):
    """model.py with TensorFlow and the standard library only (the image has nothing else of ours)."""
    binds = {"/code": EXAMPLE, "/checks": CHECKS, "/model": runs.out, "/data": cifar_dataset}
    res = subprocess.run(apptainer_exec(tf_image, binds, "python3", "/checks/model_check.py", "/model", "--images", "20"),
                         capture_output=True, text=True, timeout=300, cwd="/")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["images"] == 20 and summary["model_file"] == "/model/model/model.keras"

"""A health-check run under its watchdog, and the command line on this machine (dry runs with
a private state folder: the nodes' own checks never see these faults)."""
import json
import threading
import time

import pytest

from monitor.checks import Status
from monitor.config import HealthConfig
from monitor.health import run_health_check
from tests.monitor.conftest import aiportal

pytestmark = pytest.mark.slurm


def quick(**facts):
    return lambda c, n, f: dict(facts)


def test_a_hanging_probe_is_cut_off_by_the_watchdog():
    blocked = threading.Event()
    groups = {"slurm": quick(configured_gpus=1, node_state=None), "gres": quick(gpu_devices={"/dev/x": 195}),
              "slurmd_gres": quick(slurmd_gpus=1), "nvidia": quick(driver=False),
              "scratch": quick(free_mb={"scratch": 9999}), "mounts": quick(),
              "shared": lambda c, n, f: blocked.wait(), "munge": quick(), "apptainer": quick(apptainer_seconds=0.1)}
    t0 = time.monotonic()
    report = run_health_check(HealthConfig(timeout_s=1.5, probe_timeout_s=1.0), "g1n1", dry_run=True, groups=groups)
    took = time.monotonic() - t0
    blocked.set()
    assert took < 2.5, took
    failed = {v.check: v for v in report.failures}
    assert set(failed) == {"shared_writable", "shared_free", "watchdog"}
    assert "shared" in failed["watchdog"].detail


def private_faults(tmp_path, node, mode):
    (tmp_path / "faults").mkdir()
    (tmp_path / "faults" / ("%s.json" % node)).write_text(json.dumps({"node": node, "modes": {mode: {}}}))
    import os
    return dict(os.environ, AIPORTAL_HEALTH_STATE_DIR=str(tmp_path))


def test_healthy_node_is_fast_and_says_what_it_skipped():
    res = aiportal("health", "check", "--node", "g4n2", "--dry-run", "--json", "--all")
    report = json.loads(res.stdout)
    assert report["healthy"] and report["dry_run"] and report["seconds"] < 10
    by = {v["check"]: v for v in report["verdicts"]}
    assert by["gpu_devices"]["status"] == "pass" and by["gpu_devices"]["value"] == "4"
    assert by["slurm_gres"]["status"] == "pass"
    assert by["nvidia_smi"]["status"] == "skip" and "no NVIDIA driver" in by["nvidia_smi"]["detail"]
    assert by["apptainer"]["status"] == "pass" and by["munge"]["status"] == "pass"
    assert by["shared_writable"]["status"] == "pass"


def test_check_finishes_inside_its_watchdog_when_the_shared_filesystem_hangs(tmp_path):
    env = private_faults(tmp_path, "g4n2", "hang")
    t0 = time.monotonic()
    res = aiportal("health", "check", "--node", "g4n2", "--dry-run", "--json", "--timeout", "4", env=env, check=False)
    took = time.monotonic() - t0
    assert res.returncode == 1, res.stderr
    report = json.loads(res.stdout)
    assert took < 4 + 2, took                        # the watchdog (4 s) plus interpreter start
    first = [v for v in report["verdicts"] if v["status"] == "fail"][0]
    assert first["check"] == "shared_writable" and "no answer" in first["detail"]
    assert report["action"] == "drain" and report["action_reason"].startswith("aiportal: shared_writable: unknown")


def test_first_failure_by_default_all_with_all(tmp_path):
    env = private_faults(tmp_path, "g4n2", "disk")
    first = json.loads(aiportal("health", "check", "--node", "g4n2", "--dry-run", "--json", env=env, check=False).stdout)
    assert first["verdicts"][-1]["check"] == "scratch_free" and first["verdicts"][-1]["status"] == "fail"
    assert first["verdicts"][-1]["value"] == "0MB" and first["verdicts"][-1]["limit"] == "1024MB"
    every = json.loads(aiportal("health", "check", "--node", "g4n2", "--dry-run", "--json", "--all", env=env,
                                check=False).stdout)
    assert len(every["verdicts"]) > len(first["verdicts"])
    text = aiportal("health", "check", "--node", "g4n2", "--dry-run", env=env, check=False).stdout
    assert "FAIL scratch_free" in text and "emulated full" in text and "dry run" in text


def test_fault_injection_is_refused_outside_the_dev_cluster():
    import os
    res = aiportal("dev", "fail-node", "g4n2", "--mode", "gpu", env=dict(os.environ, AIPORTAL_HEALTH_DEV_FAULTS="false"),
                   check=False)
    assert res.returncode == 2 and "dev cluster only" in res.stderr


def test_unknown_node_is_named():
    res = aiportal("health", "check", "--node", "nosuchnode", "--dry-run", "--json", check=False)
    report = json.loads(res.stdout)
    assert res.returncode == 1 and report["action"] == "none"
    assert any("nosuchnode" in v["detail"] for v in report["verdicts"] if v["status"] == Status.FAIL.value)

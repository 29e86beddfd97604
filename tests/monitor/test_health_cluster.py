"""The health loop on the real dev cluster: Slurm runs `aiportal-healthcheck` on every node
every HealthCheckInterval; a faked GPU failure drains the node within one interval, `--heal`
brings it back after N passes, and an admin's drain survives passing checks. Every node a test
breaks is healed in a finalizer, also when the test fails."""
import json
import time

import pytest
from sqlmodel import Session, select

from portal.models import Event, EventKind
from portal.daemons.monitor import HealthMonitor
from slurm.backend import SlurmCli
from tests.monitor.conftest import aiportal, heal_node, health_interval, idle_node, site_settings, wait_node

pytestmark = pytest.mark.slurm


def test_gpu_fault_drains_within_one_interval_takes_no_jobs_and_resumes_after_n_passes(request, slurm, db_engine):
    settings = site_settings()
    interval, passes = health_interval(), settings.health.resume_after_passes
    node = idle_node(["g1n2", "g1n1"])
    request.addfinalizer(lambda: heal_node(node))
    mon = HealthMonitor(db_engine, SlurmCli(timeout=20), settings)
    mon.cycle()                                           # first sight of every node: no events

    t0 = time.monotonic()
    aiportal("dev", "fail-node", node, "--mode", "gpu")
    state, reason, took = wait_node(node, lambda s, r: r.startswith("aiportal:"), timeout=interval + 10, step=0.25)
    assert reason == "aiportal: gpu_devices: 0 (limit 1)"
    assert state in ("drained", "draining")
    # within one interval (plus the run itself and our polling)
    assert took <= interval + 3, "drained after %.1fs, HealthCheckInterval is %ds" % (took, interval)

    job = slurm.sbatch("#!/bin/bash\necho ran on $SLURMD_NODENAME\n", "--partition=gpu-1card",
                       "--nodelist=%s" % node, "--gres=gpu:p40:1", "--time=2")
    time.sleep(3)
    assert slurm.state(job) == "PENDING"                  # it takes no new jobs
    mon.cycle()

    healed = time.monotonic()
    aiportal("dev", "fail-node", node, "--heal")
    state, reason, took = wait_node(node, lambda s, r: s in ("idle", "mixed", "allocated", "completing") and not r,
                                    timeout=(passes + 1) * interval + 10, step=0.5)
    assert took >= (passes - 1) * interval - 2, "resumed after %.1fs: before %d passes" % (took, passes)
    state_file = json.loads((__import__("pathlib").Path(settings.health.state_dir) / ("%s.json" % node)).read_text())
    assert state_file["passes"] >= passes and state_file["healthy"]
    assert slurm.wait(job, timeout=90) == "COMPLETED"
    assert "ran on %s" % node in job.output.read_text()
    mon.cycle()
    with Session(db_engine) as db:
        events = db.exec(select(Event).where(Event.node == node, Event.job_id.is_(None)).order_by(Event.id)).all()
    kinds = [(e.kind, e.message) for e in events]
    assert kinds[0] == (EventKind.DRAIN, "drained by the health check: aiportal: gpu_devices: 0 (limit 1)")
    assert kinds[-1][0] is EventKind.RESUME and len(kinds) == 2, kinds
    print("drain %.1fs after the fault; resumed %.1fs after heal" % (healed - t0, time.monotonic() - healed))


def test_admin_drain_survives_passing_checks(request, db_engine):
    settings = site_settings()
    interval, passes = health_interval(), settings.health.resume_after_passes
    node = idle_node(["g4n2", "g4n1"])
    reason = "aiportal-test admin: replacing a fan (root-admin)"

    def undrain():
        if reason in SlurmCli().node(node).reason:
            SlurmCli().resume(node)
    request.addfinalizer(undrain)
    SlurmCli().drain(node, reason)
    path = __import__("pathlib").Path(settings.health.state_dir) / ("%s.json" % node)
    start = json.loads(path.read_text())["passes"]
    deadline = time.monotonic() + (passes + 2) * interval + 10
    while time.monotonic() < deadline and json.loads(path.read_text())["passes"] < start + passes + 1:
        time.sleep(1)
    assert json.loads(path.read_text())["passes"] >= start + passes + 1, "the health check did not run"
    state, now_reason = wait_node(node, lambda s, r: True, timeout=5)[:2]
    assert state == "drained" and now_reason == reason

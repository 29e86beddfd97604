"""Facts about one node, gathered once per health-check run (the adapter side of the checks).

Each group of facts is gathered in its own thread by bounded probes (:mod:`monitor.probe`);
the whole gathering has a deadline (the watchdog). A group that fails or runs out of time
leaves an entry in ``errors`` and its checks fail; a group that does not apply leaves one in
``skipped``.

Dev cluster (``dev_faults``): ``aiportal dev fail-node`` writes ``STATE_DIR/faults/NODE.json``;
only then, and only for the ``disk`` and ``hang`` modes, do facts differ from what the node
really has (scratch reported full; the shared-filesystem probe made to block). The ``gpu`` mode
moves the node's fake device file aside and needs no help from here.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from containers.apptainer import health_probe_argv
from monitor import parse
from monitor.config import HealthConfig
from monitor.errors import MonitorError
from monitor.probe import bounded_run, fs_probe, probe_env
from slurm.backend import SlurmCli
from slurm.cluster import NodeState
from slurm.errors import SlurmError

log = logging.getLogger(__name__)


@dataclass
class Facts:
    node: str
    configured_gpus: int | None = None
    node_state: NodeState | None = None
    node_reason: str = ""
    #: device file -> major number (None: missing, -1: not a character device)
    gpu_devices: dict[str, int | None] = field(default_factory=dict)
    slurmd_gpus: int | None = None
    driver: bool = False
    gpus: tuple[parse.GpuStatus, ...] = ()
    xids: tuple[int, ...] = ()
    free_mb: dict[str, int] = field(default_factory=dict)
    shared_fstype: str | None = None
    shared_seconds: float = 0.0
    apptainer_seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    faults: tuple[str, ...] = ()


def fault_file(state_dir: str, node: str) -> Path:
    return Path(state_dir) / "faults" / ("%s.json" % node)


def read_faults(config: HealthConfig, node: str) -> tuple[str, ...]:
    """Fault modes injected into ``node`` (dev cluster only; () elsewhere)."""
    if not config.dev_faults:
        return ()
    try:
        data = json.loads(fault_file(config.state_dir, node).read_text())
    except (OSError, ValueError):
        return ()
    return tuple(sorted(data.get("modes", {})))


# -- the groups: each returns the Facts fields it found ------------------------------------------

def _slurm(c: HealthConfig, node: str, faults) -> dict:
    try:
        info = SlurmCli(c.slurm_conf, timeout=c.probe_timeout_s).node(node)
    except (SlurmError, ValueError) as e:
        raise MonitorError("slurmctld's view of %s: %s" % (node, e)) from e
    if info is None:
        raise MonitorError("Slurm does not know node %r (check --node / SLURMD_NODENAME)" % node)
    return {"configured_gpus": info.gpus, "node_state": info.state, "node_reason": info.reason}


def _gres(c: HealthConfig, node: str, faults) -> dict:
    conf = Path(c.slurm_conf).parent / "gres.conf"
    try:
        files = parse.gres_conf_gpu_files(conf.read_text(), node)
    except FileNotFoundError:
        files = []
    except OSError as e:
        raise MonitorError("cannot read %s: %s" % (conf, e.strerror)) from e
    devices: dict[str, int | None] = {}
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            devices[path] = None
            continue
        devices[path] = os.major(st.st_rdev) if stat.S_ISCHR(st.st_mode) else -1
    return {"gpu_devices": devices}


def _slurmd_gres(c: HealthConfig, node: str, faults) -> dict:
    # slurmd -G waits ~19 s for a missing device file before giving up: do not ask it then
    conf = Path(c.slurm_conf).parent / "gres.conf"
    try:
        files = parse.gres_conf_gpu_files(conf.read_text(), node) if conf.exists() else []
    except OSError as e:
        raise MonitorError("cannot read %s: %s" % (conf, e.strerror)) from e
    missing = [p for p in files if not os.path.exists(p)]
    if missing:
        return {"skipped": {"slurmd_gres": "not asked: device files missing (%s)" % ", ".join(missing)}}
    res = bounded_run([c.slurmd, "-N", node, "-G"], c.probe_timeout_s, env=probe_env({"SLURM_CONF": c.slurm_conf}))
    if not res.ok:
        raise MonitorError("slurmd -N %s -G: %s" % (node, res.why()))
    return {"slurmd_gpus": parse.slurmd_gres_gpus(res.stdout + res.stderr)}


def _nvidia(c: HealthConfig, node: str, faults) -> dict:
    smi = shutil.which(c.nvidia_smi, path=probe_env()["PATH"])
    if not os.path.exists("/dev/nvidiactl") or not smi:
        what = "/dev/nvidiactl" if not os.path.exists("/dev/nvidiactl") else c.nvidia_smi
        return {"driver": False, "skipped": {"nvidia": "no NVIDIA driver here (%s missing): skipped" % what}}
    out: dict = {"driver": True, "skipped": {}, "errors": {}}
    res = bounded_run([smi, "--query-gpu=" + parse.SMI_QUERY, "--format=csv,noheader,nounits"], c.probe_timeout_s)
    if res.ok:
        out["gpus"] = tuple(parse.parse_nvidia_smi(res.stdout))
    else:
        out["errors"]["nvidia_smi"] = "nvidia-smi: " + res.why()
    k = bounded_run(["dmesg", "--kernel", "--nopager"], c.probe_timeout_s)
    if k.ok:
        out["xids"] = tuple(parse.parse_xids(k.stdout))
    else:
        out["skipped"]["xid"] = "kernel log unreadable (%s): XIDs not checked" % k.why()
    return out


def _scratch(c: HealthConfig, node: str, faults) -> dict:
    res = fs_probe(c.scratch_path, None, c.probe_timeout_s)
    if not res.ok:
        raise MonitorError("%s: %s" % (c.scratch_path, res.why()))
    free = json.loads(res.stdout)["free_mb"]
    if "disk" in faults:
        return {"free_mb": {"scratch": 0},
                "notes": {"scratch": "emulated full by `aiportal dev fail-node --mode disk`; really %d MB" % free}}
    return {"free_mb": {"scratch": free}}


def _mounts(c: HealthConfig, node: str, faults) -> dict:
    if not c.shared_mount:
        return {}
    found = parse.mount_of(Path("/proc/self/mounts").read_text(), c.shared_mount)
    return {"shared_fstype": found[1] if found else None}


def _shared(c: HealthConfig, node: str, faults) -> dict:
    res = fs_probe(c.shared_root, ".aiportal-health.%s.probe" % node, c.probe_timeout_s, hang="hang" in faults)
    if not res.ok:
        raise MonitorError("%s: %s" % (c.shared_root, res.why()))
    return {"free_mb": {"shared": json.loads(res.stdout)["free_mb"]}, "shared_seconds": res.seconds}


def _munge(c: HealthConfig, node: str, faults) -> dict:
    cred = bounded_run(["munge", "-n"], c.probe_timeout_s)
    if not cred.ok:
        raise MonitorError("munge -n: %s (is munged running?)" % cred.why())
    back = bounded_run(["unmunge"], c.probe_timeout_s, stdin=cred.stdout)
    if not back.ok:
        raise MonitorError("unmunge: %s" % back.why())
    return {}


def _apptainer(c: HealthConfig, node: str, faults) -> dict:
    if not os.path.exists(c.probe_image):
        raise MonitorError("probe image %s is missing (the Ansible apptainer role builds it; or set "
                           "health.probe_image)" % c.probe_image)
    res = bounded_run(health_probe_argv(c.probe_image, apptainer=c.apptainer), c.probe_timeout_s)
    if not res.ok:
        raise MonitorError("apptainer exec %s /bin/true: %s" % (c.probe_image, res.why()))
    return {"apptainer_seconds": res.seconds}


Gatherer = Callable[[HealthConfig, str, tuple], dict]

#: group name -> gatherer; a failing group's error is filed under its name
GROUPS: dict[str, Gatherer] = {
    "slurm": _slurm, "gres": _gres, "slurmd_gres": _slurmd_gres, "nvidia": _nvidia, "scratch": _scratch,
    "mounts": _mounts, "shared": _shared, "munge": _munge, "apptainer": _apptainer,
}
#: which groups each check needs (a check skipped by configuration gathers nothing)
NEEDS: dict[str, tuple[str, ...]] = {
    "gpu_devices": ("slurm", "gres"), "slurm_gres": ("slurm", "slurmd_gres"), "nvidia_smi": ("slurm", "nvidia"),
    "gpu_retired_pages": ("nvidia",), "gpu_xid": ("nvidia",), "scratch_free": ("scratch",),
    "shared_mounted": ("mounts",), "shared_writable": ("shared",), "shared_free": ("shared",),
    "munge": ("munge",), "apptainer": ("apptainer",),
}


def gather(config: HealthConfig, node: str, deadline: float, groups: dict[str, Gatherer] | None = None) -> Facts:
    """Gather every needed group concurrently; stop waiting at ``deadline`` (time.monotonic).
    Groups still running then are abandoned (their threads are daemons) and reported in
    ``errors['watchdog']`` and under their own names."""
    groups = dict(GROUPS if groups is None else groups)
    wanted = {g for check, gs in NEEDS.items() if check not in config.skip_checks for g in gs}
    wanted |= {g for g in groups if g not in {x for gs in NEEDS.values() for x in gs}}
    faults = read_faults(config, node)
    facts = Facts(node=node, faults=faults)
    results: dict[str, dict | BaseException] = {}
    lock = threading.Lock()

    def run(name: str, fn: Gatherer) -> None:
        try:
            value: dict | BaseException = fn(config, node, faults)
        except (MonitorError, OSError, ValueError, KeyError) as e:
            value = e
        with lock:
            results[name] = value

    threads = []
    for name, fn in groups.items():
        if name in wanted:
            t = threading.Thread(target=run, args=(name, fn), name="health-%s" % name, daemon=True)
            t.start()
            threads.append((name, t))
    for name, t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    with lock:
        done = dict(results)
    late = [name for name, _ in threads if name not in done]
    for name in late:
        facts.errors[name] = "no answer before the watchdog (%s)" % name
    if late:
        facts.errors["watchdog"] = "still running at the deadline: %s" % ", ".join(late)
    for name, value in done.items():
        if isinstance(value, BaseException):
            facts.errors[name] = str(value)
            continue
        for key, v in value.items():
            if key in ("errors", "skipped", "notes", "free_mb"):
                getattr(facts, key).update(v)
            else:
                setattr(facts, key, v)
    return facts

"""Fault injection for the one-machine dev cluster: make one emulated node fail, and heal it.

Every "node" of the dev cluster is a ``slurmd -N NAME`` on this one machine, so a fault must
hit that node only:

- ``gpu``: its first fake GPU device file (``/var/lib/aiportal/fakegpu/NODE/nvidia0``) is moved
  aside, exactly what a GPU that fell off the bus looks like to the ``gpu_devices`` check;
- ``disk``: a marker the check reads (only with ``health.dev_faults``): its scratch reads as full;
- ``hang``: a marker: its shared-filesystem probe blocks, like a stuck NFS mount (the probe's
  timeout and the watchdog are what is tested);
- ``slurmd``: the node dies: its slurmd is killed (by its pid file, SIGKILL) and so are the
  processes of the jobs running on it (their slurmstepd and everything below it, by pid); a
  real node's jobs die with it. ``--heal`` starts slurmd again with the argv read from
  /proc/PID/cmdline before the kill.

The state of injected faults is kept in ``STATE_DIR/faults/NODE.json``. Refused unless the site
settings say ``dev_faults = true`` under ``[health]`` (only the dev inventory does).
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from monitor import parse
from monitor.config import HealthConfig
from monitor.errors import FaultError
from monitor.facts import fault_file
from monitor.probe import probe_env
from slurm.backend import SlurmCli
from slurm.errors import SlurmError

log = logging.getLogger(__name__)

MODES = ("gpu", "disk", "slurmd", "hang")
ASIDE_SUFFIX = ".aiportal-fault"


def _state(config: HealthConfig, node: str) -> dict:
    try:
        data = json.loads(fault_file(config.state_dir, node).read_text())
    except (OSError, ValueError):
        return {"node": node, "modes": {}}
    data.setdefault("modes", {})
    return data


def _save(config: HealthConfig, node: str, data: dict) -> None:
    path = fault_file(config.state_dir, node)
    if not data["modes"]:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)   # root's only
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)       # an older file of that name kept its mode
        fh.write(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _guard(config: HealthConfig, node: str) -> SlurmCli:
    if not config.dev_faults:
        raise FaultError("fault injection is for the one-machine dev cluster only: set dev_faults = true under "
                         "[health] in site.toml (the dev inventory does) to use it")
    if os.geteuid() != 0:
        raise FaultError("fault injection moves device files and kills daemons: run it as root")
    backend = SlurmCli(config.slurm_conf, timeout=10)
    try:
        known = backend.node(node)
    except (SlurmError, ValueError) as e:
        raise FaultError("cannot ask Slurm about node %r: %s" % (node, e)) from e
    if known is None:
        raise FaultError("Slurm has no node %r (see `sinfo -N`)" % node)
    return backend


def slurm_conf_value(text: str, key: str) -> str | None:
    """The value of ``key`` in slurm.conf text (case-insensitive key; the last one wins)."""
    found = None
    for line in text.splitlines():
        k, sep, v = line.split("#", 1)[0].strip().partition("=")
        if sep and k.strip().lower() == key.lower():
            found = v.strip()
    return found


def slurmd_pidfile(config: HealthConfig, node: str) -> Path:
    text = Path(config.slurm_conf).read_text()
    pattern = slurm_conf_value(text, "SlurmdPidFile") or "/var/run/slurmd.pid"
    return Path(pattern.replace("%n", node).replace("%h", node))


def _cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path("/proc/%d/cmdline" % pid).read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def job_processes(job_ids: set[str]) -> list[int]:
    """Pids of the slurmstepd processes of these jobs and everything below them."""
    roots = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        cmd = _cmdline(int(d.name))
        m = re.match(r"^slurmstepd: \[(\d+)[.\]]", cmd[0]) if cmd else None
        if m and m.group(1) in job_ids:
            roots.append(int(d.name))
    kids, out, todo = _children(), [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def inject(config: HealthConfig, node: str, mode: str) -> list[str]:
    if mode not in MODES:
        raise FaultError("--mode %r: choose one of %s" % (mode, ", ".join(MODES)))
    backend = _guard(config, node)
    data = _state(config, node)
    if mode in data["modes"]:
        return ["%s: fault %s is already injected (heal it with --heal)" % (node, mode)]
    done: list[str] = []
    if mode == "gpu":
        conf = Path(config.slurm_conf).parent / "gres.conf"
        files = [p for p in parse.gres_conf_gpu_files(conf.read_text(), node) if os.path.exists(p)]
        if not files:
            raise FaultError("node %s has no GPU device file left to fail (gres.conf: %s)" % (node, conf))
        src = files[0]
        aside = str(Path(src).with_name("." + Path(src).name + ASIDE_SUFFIX))
        os.rename(src, aside)
        data["modes"]["gpu"] = {"moved": [[src, aside]]}
        done.append("%s: moved GPU device %s aside (%s)" % (node, src, aside))
    elif mode == "slurmd":
        pidfile = slurmd_pidfile(config, node)
        pid = _read_pid(pidfile)
        argv = _cmdline(pid) if pid else []
        if not pid or not _alive(pid) or not argv or not os.path.basename(argv[0]).startswith("slurmd") \
                or node not in argv:
            raise FaultError("no live slurmd for %s in %s (argv %r)" % (node, pidfile, argv))
        try:
            jobs = {j.job_id.split("_")[0] for j in backend.recovery_jobs().values() if j.nodes == node}
        except SlurmError as e:
            raise FaultError("cannot list the jobs on %s: %s" % (node, e)) from e
        # write the state first: a crash after the kill still knows how to heal
        data["modes"]["slurmd"] = {"argv": argv, "pid": pid, "pidfile": str(pidfile), "jobs": sorted(jobs)}
        _save(config, node, data)
        os.kill(pid, signal.SIGKILL)
        procs = job_processes(jobs) if jobs else []
        for p in procs:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        data["modes"]["slurmd"]["killed"] = procs
        done.append("%s: killed slurmd (pid %d) and %d processes of its jobs %s; heal restarts %s"
                    % (node, pid, len(procs), ",".join(sorted(jobs)) or "(none)", " ".join(argv)))
    else:
        data["modes"][mode] = {"at": time.time()}
        done.append("%s: %s fault marked (%s)" % (node, mode, "scratch reads as full" if mode == "disk"
                                                  else "the shared-filesystem probe blocks"))
    _save(config, node, data)
    return done


def heal(config: HealthConfig, node: str, mode: str | None = None) -> list[str]:
    """Undo ``mode`` (or every fault) on ``node``. Safe to repeat."""
    _guard(config, node)
    data = _state(config, node)
    modes = [mode] if mode else sorted(data["modes"])
    done: list[str] = []
    for m in modes:
        info = data["modes"].get(m)
        if info is None:
            done.append("%s: no %s fault to heal" % (node, m))
            continue
        if m == "gpu":
            for src, aside in info.get("moved", []):
                if os.path.exists(aside):
                    if os.path.exists(src):
                        os.unlink(aside)      # re-created meanwhile (make provision): keep that one
                    else:
                        os.rename(aside, src)
                done.append("%s: GPU device %s back" % (node, src))
        elif m == "slurmd":
            done.append(_restart_slurmd(node, info))
        else:
            done.append("%s: %s fault cleared" % (node, m))
        del data["modes"][m]
        _save(config, node, data)
    return done


def _restart_slurmd(node: str, info: dict) -> str:
    pidfile = Path(info["pidfile"])
    pid = _read_pid(pidfile)
    if pid and _alive(pid) and node in _cmdline(pid):
        return "%s: slurmd already running (pid %d)" % (node, pid)
    argv = info["argv"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=probe_env(), check=False, cwd="/")
    if res.returncode != 0:
        raise FaultError("restarting slurmd for %s (%s) failed with %d: %s"
                         % (node, " ".join(argv), res.returncode, res.stderr.strip()[-300:]))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pid = _read_pid(pidfile)
        if pid and _alive(pid):
            return "%s: slurmd started again (pid %d): %s" % (node, pid, " ".join(argv))
        time.sleep(0.2)
    raise FaultError("slurmd for %s did not write %s within 20 s after `%s`" % (node, pidfile, " ".join(argv)))

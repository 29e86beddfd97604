"""Health checks, shaped like LBNL NHC: facts are gathered once per run (:mod:`monitor.facts`),
then each ``check_<subsystem>_<purpose>(facts, config)`` is a pure function returning a
:class:`Verdict` that names the check, the value it saw and the limit it held it to.

A check whose facts are missing because their probe ran out of time fails (a stuck shared
filesystem is a failure); a check that cannot apply here (no NVIDIA driver, no shared mount
configured) is SKIPPED and says why.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

from monitor.config import HealthConfig
from monitor.facts import Facts
from monitor.ownership import DRAIN_PREFIX, owned_by_aiportal


class Status(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"        #: does not apply on this node (and says why)


@dataclass(frozen=True)
class Verdict:
    check: str
    status: Status
    value: str = ""
    limit: str = ""
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status is Status.FAIL

    def reason(self) -> str:
        """The drain reason: ``aiportal: <check>: <value> (limit <limit>)``, one line."""
        text = "%s %s: %s (limit %s)" % (DRAIN_PREFIX, self.check, self.value, self.limit)
        return " ".join(text.split())[:200]

    def to_dict(self) -> dict:
        return {"check": self.check, "status": self.status.value, "value": self.value,
                "limit": self.limit, "detail": self.detail}


def _pass(check, value, limit, detail=""):
    return Verdict(check, Status.PASS, str(value), str(limit), detail)


def _fail(check, value, limit, detail=""):
    return Verdict(check, Status.FAIL, str(value), str(limit), detail)


def _skip(check, detail):
    return Verdict(check, Status.SKIP, "", "", detail)


def _missing(check: str, facts: Facts, key: str, limit: str) -> Verdict | None:
    """A failing verdict when the facts for ``key`` are absent (probe error or timeout)."""
    err = facts.errors.get(key)
    if err is not None:
        return _fail(check, "unknown", limit, err)
    return None


def check_gpu_devices(f: Facts, c: HealthConfig) -> Verdict:
    """Every GPU the node is configured with has its device file: a character device with the
    NVIDIA major number."""
    name = "gpu_devices"
    if f.configured_gpus is None:
        return _missing(name, f, "slurm", "?") or _skip(name, "configured GPU count unknown")
    if f.configured_gpus == 0:
        return _skip(name, "no GPUs configured for this node")
    miss = _missing(name, f, "gres", str(f.configured_gpus))
    if miss:
        return miss
    good = [p for p, major in f.gpu_devices.items() if major == c.gpu_device_major]
    bad = {p: ("missing" if m is None else "not a character device" if m < 0 else "major %d" % m)
           for p, m in f.gpu_devices.items() if m != c.gpu_device_major}
    detail = ", ".join("%s %s" % kv for kv in sorted(bad.items()))
    if len(good) >= f.configured_gpus:
        return _pass(name, len(good), f.configured_gpus, detail)
    return _fail(name, len(good), f.configured_gpus, detail or "gres.conf lists %d files" % len(f.gpu_devices))


def check_slurm_gres(f: Facts, c: HealthConfig) -> Verdict:
    """slurmd's own view of the node's GPUs (``slurmd -G``) matches slurm.conf's count."""
    name = "slurm_gres"
    if f.configured_gpus is None:
        return _missing(name, f, "slurm", "?") or _skip(name, "configured GPU count unknown")
    if "slurmd_gres" in f.skipped:
        return _skip(name, f.skipped["slurmd_gres"])
    miss = _missing(name, f, "slurmd_gres", "=%d" % f.configured_gpus)
    if miss:
        return miss
    if f.slurmd_gpus == f.configured_gpus:
        return _pass(name, f.slurmd_gpus, "=%d" % f.configured_gpus)
    return _fail(name, f.slurmd_gpus, "=%d" % f.configured_gpus, "slurmd -G and slurm.conf disagree")


def check_gpu_nvidia_smi(f: Facts, c: HealthConfig) -> Verdict:
    name = "nvidia_smi"
    if not f.driver:
        return _skip(name, f.skipped.get("nvidia", "no NVIDIA driver on this node"))
    miss = _missing(name, f, "nvidia_smi", "answers")
    if miss:
        return miss
    want = f.configured_gpus or 0
    if len(f.gpus) < want:
        return _fail(name, len(f.gpus), want, "nvidia-smi sees fewer GPUs than configured")
    return _pass(name, len(f.gpus), want)


def check_gpu_retired_pages(f: Facts, c: HealthConfig) -> Verdict:
    name = "gpu_retired_pages"
    if not f.driver:
        return _skip(name, f.skipped.get("nvidia", "no NVIDIA driver on this node"))
    miss = _missing(name, f, "nvidia_smi", str(c.gpu_max_retired_pending))
    if miss:
        return miss
    pending = [g for g in f.gpus if g.retired_pending]
    detail = ", ".join("GPU %d (%s)" % (g.index, g.bus_id) for g in pending)
    if len(pending) <= c.gpu_max_retired_pending:
        return _pass(name, len(pending), c.gpu_max_retired_pending, detail)
    return _fail(name, len(pending), c.gpu_max_retired_pending, "page retirement pending (needs a GPU reset): " + detail)


def check_gpu_xid(f: Facts, c: HealthConfig) -> Verdict:
    name = "gpu_xid"
    if not f.driver:
        return _skip(name, f.skipped.get("nvidia", "no NVIDIA driver on this node"))
    if "xid" in f.skipped:
        return _skip(name, f.skipped["xid"])
    miss = _missing(name, f, "xid", str(c.gpu_max_xid_errors))
    if miss:
        return miss
    bad = [x for x in f.xids if not c.gpu_fatal_xids or x in c.gpu_fatal_xids]
    detail = ("XIDs %s" % ",".join(map(str, sorted(set(bad))))) if bad else ""
    if len(bad) <= c.gpu_max_xid_errors:
        return _pass(name, len(bad), c.gpu_max_xid_errors, detail)
    return _fail(name, len(bad), c.gpu_max_xid_errors, detail)


def _free(name: str, f: Facts, key: str, path: str, limit_mb: int) -> Verdict:
    miss = _missing(name, f, key, "%dMB" % limit_mb)
    if miss:
        return miss
    free = f.free_mb[key]
    note = f.notes.get(key, "")
    detail = ("%s: %d MB free" % (path, free)) + (" (%s)" % note if note else "")
    if free >= limit_mb:
        return _pass(name, "%dMB" % free, "%dMB" % limit_mb, detail)
    return _fail(name, "%dMB" % free, "%dMB" % limit_mb, detail)


def check_fs_scratch_free(f: Facts, c: HealthConfig) -> Verdict:
    return _free("scratch_free", f, "scratch", c.scratch_path, c.scratch_min_free_mb)


def check_fs_shared_mounted(f: Facts, c: HealthConfig) -> Verdict:
    name = "shared_mounted"
    if not c.shared_mount:
        return _skip(name, "the shared root %s is a plain folder here (health.shared_mount unset)" % c.shared_root)
    miss = _missing(name, f, "mounts", "mounted")
    if miss:
        return miss
    if f.shared_fstype:
        return _pass(name, f.shared_fstype, "mounted", "%s is a %s mount" % (c.shared_mount, f.shared_fstype))
    return _fail(name, "not mounted", "mounted", "%s is not a mount point" % c.shared_mount)


def check_fs_shared_writable(f: Facts, c: HealthConfig) -> Verdict:
    name = "shared_writable"
    limit = "%gs" % c.probe_timeout_s
    miss = _missing(name, f, "shared", limit)
    if miss:
        return miss
    return _pass(name, "%.1fs" % f.shared_seconds, limit, "wrote, read back and removed a file in %s" % c.shared_root)


def check_fs_shared_free(f: Facts, c: HealthConfig) -> Verdict:
    return _free("shared_free", f, "shared", c.shared_root, c.shared_min_free_mb)


def check_munge_roundtrip(f: Facts, c: HealthConfig) -> Verdict:
    name = "munge"
    miss = _missing(name, f, "munge", "round trip")
    return miss or _pass(name, "ok", "round trip")


def check_apptainer_run(f: Facts, c: HealthConfig) -> Verdict:
    name = "apptainer"
    limit = "%gs" % c.probe_timeout_s
    if "apptainer" in f.skipped:
        return _skip(name, f.skipped["apptainer"])
    miss = _missing(name, f, "apptainer", limit)
    return miss or _pass(name, "%.1fs" % f.apptainer_seconds, limit, "ran %s" % c.probe_image)


Check = Callable[[Facts, HealthConfig], Verdict]

#: in order: the first failure names the drain reason
CHECKS: tuple[tuple[str, Check], ...] = (
    ("gpu_devices", check_gpu_devices),
    ("slurm_gres", check_slurm_gres),
    ("nvidia_smi", check_gpu_nvidia_smi),
    ("gpu_retired_pages", check_gpu_retired_pages),
    ("gpu_xid", check_gpu_xid),
    ("scratch_free", check_fs_scratch_free),
    ("shared_mounted", check_fs_shared_mounted),
    ("shared_writable", check_fs_shared_writable),
    ("shared_free", check_fs_shared_free),
    ("munge", check_munge_roundtrip),
    ("apptainer", check_apptainer_run),
)
CHECK_NAMES = tuple(n for n, _ in CHECKS)

#: failures after which running jobs cannot finish well: the monitor requeues them at once.
#: Others (space running low, page retirement pending, munge, apptainer) drain the node and
#: let running jobs finish.
HARD_CHECKS = frozenset({"gpu_devices", "nvidia_smi", "gpu_xid", "shared_mounted", "shared_writable", "watchdog"})


def run_checks(facts: Facts, config: HealthConfig) -> list[Verdict]:
    """Every check, in order (skipped ones as SKIP verdicts)."""
    out = []
    for name, fn in CHECKS:
        if name in config.skip_checks:
            out.append(_skip(name, "skipped by health.skip_checks"))
            continue
        out.append(fn(facts, config))
    for key, err in facts.errors.items():
        if key == "watchdog":
            out.append(_fail("watchdog", "unfinished probes", "%gs" % config.timeout_s, err))
    return out


def check_of_reason(reason: str) -> str | None:
    """``aiportal: gpu_devices: 0 (limit 1)`` -> ``gpu_devices``; None for other reasons."""
    if not owned_by_aiportal(reason):
        return None
    rest = reason.lstrip()[len(DRAIN_PREFIX):].strip()
    name, sep, _ = rest.partition(":")
    return name.strip() if sep else None


def is_hard_failure(reason: str) -> bool:
    """A drain reason of ours whose check means running jobs cannot finish."""
    return check_of_reason(reason) in HARD_CHECKS

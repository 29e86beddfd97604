"""Thresholds and paths of the health check: the one declaration of the health settings.

The portal's ``Settings.health`` is this object, read from the ``[health]`` table of site.toml
(every node reads it) and ``AIPORTAL_HEALTH_<FIELD>`` environment variables; ``slurm_conf`` and
``shared_root`` are not in that table: they are the site's top-level settings of the same name,
copied in. Tests build it directly. Messages name a field as the site admin writes it in
site.toml: ``health.<field>`` (a dotted key, or ``<field>`` under ``[health]``).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HealthConfig:
    slurm_conf: str = "/etc/slurm/slurm.conf"
    #: node-local folder for the pass counters (NODE.json) and, in the dev cluster, fault markers
    state_dir: str = "/var/lib/aiportal/health"
    #: node-local scratch (Slurm's TmpFS) and its minimum free space
    scratch_path: str = "/tmp"
    scratch_min_free_mb: int = 1024
    #: the shared filesystem: a folder on it is written to, its free space checked
    shared_root: str = "/srv/aiportal/shared"
    #: mount point that must be mounted (an NFS mount on real sites); "" = the shared root is a
    #: plain folder (the dev cluster: the kernel here has no NFS client) and the check is skipped
    shared_mount: str = ""
    shared_min_free_mb: int = 1024
    #: a tiny SIF `apptainer exec` must be able to run (built by the Ansible apptainer role)
    probe_image: str = "/var/lib/aiportal/health/probe.sif"
    #: deadline of each probe (command, filesystem round trip)
    probe_timeout_s: float = 5.0
    #: watchdog of the whole run (Slurm kills HealthCheckProgram after 60 s)
    timeout_s: float = 20.0
    #: an aiportal drain is resumed after this many passing runs in a row
    resume_after_passes: int = 3
    gpu_device_major: int = 195
    gpu_max_retired_pending: int = 0
    gpu_max_xid_errors: int = 0
    #: XIDs that count (NVIDIA's "fatal" ones: DBE, fell off the bus, ...); empty = all
    gpu_fatal_xids: tuple[int, ...] = (48, 63, 64, 74, 79, 92, 94, 95, 119, 120)
    #: checks not to run at all (by name)
    skip_checks: tuple[str, ...] = ()
    #: dev cluster only: honour fault markers written by `aiportal dev fail-node`
    dev_faults: bool = False
    apptainer: str = "apptainer"
    slurmd: str = "/usr/sbin/slurmd"
    nvidia_smi: str = "nvidia-smi"

    def __post_init__(self) -> None:
        if self.resume_after_passes < 1:
            raise ValueError("health.resume_after_passes must be at least 1, got %r" % self.resume_after_passes)
        if not 0 < self.probe_timeout_s < self.timeout_s:
            raise ValueError("health.probe_timeout_s (%s) must be above 0 and below health.timeout_s (%s)"
                             % (self.probe_timeout_s, self.timeout_s))
        if self.timeout_s >= 55:
            raise ValueError("health.timeout_s %s: Slurm kills HealthCheckProgram after 60 s; keep the "
                             "watchdog well below that (default 20)" % self.timeout_s)

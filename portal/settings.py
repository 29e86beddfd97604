"""One typed, frozen settings object, built at the entry points and passed down.

Sources, later wins: built-in defaults, the TOML file named by ``AIPORTAL_CONFIG`` (or passed
in), then ``AIPORTAL_*`` environment variables. Nothing else in aiportal reads the environment.
Secrets have no defaults: a missing ``secret_key`` or admin token hash stops start-up.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from portal.errors import ConfigError
from slurm.spec import NodeType

DEFAULT_SITE = "/etc/aiportal/site.toml"
#: settings that are secrets: never in site.toml (world-readable), only in portal.toml (root)
SECRETS = ("secret_key", "admin_token_sha256", "data_key", "notify_webhook_secret", "notify_smtp_password")
DEFAULT_CONFIG = "/etc/aiportal/portal.toml"


DEFAULT_NODE_TYPES = {
    "1card": NodeType("1card", "gpu-1card", 1, "p40", 8, 32000),
    "4card": NodeType("4card", "gpu-4card", 4, "p40", 48, 256000),
    "infer": NodeType("infer", "infer", 1, "p40", 8, 32000),
}


@dataclass(frozen=True)
class Settings:
    """Site settings (public, ``site.toml``) and the portal's own (secrets, ``portal.toml``).

    Command-line tools on nodes load with ``require_secrets=False``: they never see the
    portal's secrets (portal.toml is root-only)."""

    secret_key: str = ""
    admin_token_sha256: str = ""
    # Fernet key that seals data-source credentials at rest (storage.credentials.SecretBox)
    data_key: str = ""
    database_url: str = "sqlite:////var/lib/aiportal/portal.db"
    bind: str = "127.0.0.1:8000"
    #: web servers in front of the portal whose X-Forwarded-For/-Proto to trust (the portal
    #: role puts nginx in front: 1); 0 when clients reach gunicorn directly
    proxy_hops: int = 0
    shared_root: str = "/srv/aiportal/shared"
    slurm_conf: str = "/etc/slurm/slurm.conf"
    cluster_name: str = "aiportal"
    slurm_timeout_s: float = 15.0
    #: a job stored but not in Slurm after this long is submitted again by the reconciler
    submit_grace_s: float = 120.0
    reconcile_interval_s: float = 2.0
    stage_bin: str = "aiportal"
    image_cache: str = "/srv/aiportal/shared/images/cache"
    image_builder_user: str = "aiportal-img"
    image_build_partition: str = "gpu-1card"
    # sshd the portal tails job logs through, as the job's user (ansible role log_sshd)
    log_ssh_host: str = "127.0.0.1"
    log_ssh_port: int = 2222
    log_ssh_key: str = "/etc/aiportal/ssh/portal_ed25519"
    log_ssh_known_hosts: str = "/etc/aiportal/ssh/known_hosts"
    node_types: Mapping[str, NodeType] = field(default_factory=lambda: dict(DEFAULT_NODE_TYPES))

    # -- inference services (docs/inference.md) --
    #: the node type replicas run on (its partition must allow --time=UNLIMITED)
    service_node_type: str = "infer"
    #: the address replicas listen on: loopback on the one-machine dev cluster; 0.0.0.0 where the
    #: portal reaches the inference nodes over the network
    service_bind_host: str = "127.0.0.1"
    service_probe_timeout_s: float = 1.0
    service_initial_delay_s: float = 0.5
    service_failure_threshold: int = 3
    service_startup_timeout_s: float = 600.0
    service_unhealthy_timeout_s: float = 30.0
    service_drain_grace_s: float = 2.0
    #: where ``aiportal router`` listens: HOST:PORT or unix:PATH (the web server in front of the
    #: portal passes /service/ there)
    router_listen: str = "unix:/run/aiportal/front/router.sock"
    #: how often the router re-reads the ready replicas (and forgets tokens it checked)
    router_refresh_s: float = 0.5
    #: how long the router waits for a replica's answer
    router_timeout_s: float = 300.0

    # -- health checks (site.toml: every node reads them; see docs/health.md) --
    health_state_dir: str = "/var/lib/aiportal/health"
    health_scratch_path: str = "/tmp"
    health_scratch_min_free_mb: int = 1024
    #: a mount point that must be mounted (the NFS mount); "" where the shared root is a plain folder
    health_shared_mount: str = ""
    health_shared_min_free_mb: int = 1024
    health_probe_image: str = "/var/lib/aiportal/health/probe.sif"
    health_probe_timeout_s: float = 5.0
    #: watchdog of a whole run; Slurm kills HealthCheckProgram after 60 s
    health_timeout_s: float = 20.0
    health_resume_after_passes: int = 3
    health_gpu_max_retired_pending: int = 0
    health_gpu_max_xid_errors: int = 0
    health_skip_checks: tuple[str, ...] = ()
    #: the one-machine dev cluster only: `aiportal dev fail-node` may inject faults
    health_dev_faults: bool = False

    # -- the monitor daemon (portal host): recovery and notifications --
    monitor_interval_s: float = 3.0
    #: a requeued job whose begin time is at most this far ahead is released at once (Slurm's
    #: requeue hold is ~120 s; a user's own --begin further ahead is left alone)
    monitor_release_within_s: float = 300.0
    #: the portal's address in notifications (links to the job page)
    portal_url: str = "http://127.0.0.1:8000"
    notify_webhook_url: str = ""
    #: secret: signs webhook bodies (X-Aiportal-Signature: sha256=HMAC); portal.toml only
    notify_webhook_secret: str = ""
    notify_smtp_host: str = ""
    notify_smtp_port: int = 25
    notify_smtp_user: str = ""
    #: secret: portal.toml only
    notify_smtp_password: str = ""
    notify_smtp_starttls: bool = False
    notify_email_from: str = "aiportal@localhost"
    #: users without an email address get UNIXUSER@this domain ("" = no email for them)
    notify_email_domain: str = ""
    #: node events (drain, resume, node down) go to the webhook too (job events always do)
    notify_node_events: bool = False
    notify_max_attempts: int = 8
    notify_backoff_s: float = 5.0
    notify_timeout_s: float = 10.0

    def health_config(self):
        """The health check's thresholds (:class:`monitor.config.HealthConfig`)."""
        from monitor.config import HealthConfig
        try:
            return HealthConfig(
                slurm_conf=self.slurm_conf, state_dir=self.health_state_dir, scratch_path=self.health_scratch_path,
                scratch_min_free_mb=self.health_scratch_min_free_mb, shared_root=self.shared_root,
                shared_mount=self.health_shared_mount, shared_min_free_mb=self.health_shared_min_free_mb,
                probe_image=self.health_probe_image, probe_timeout_s=self.health_probe_timeout_s,
                timeout_s=self.health_timeout_s, resume_after_passes=self.health_resume_after_passes,
                gpu_max_retired_pending=self.health_gpu_max_retired_pending,
                gpu_max_xid_errors=self.health_gpu_max_xid_errors, skip_checks=tuple(self.health_skip_checks),
                dev_faults=self.health_dev_faults)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None,
             require_secrets: bool = True, site_path: str | os.PathLike | None = None) -> "Settings":
        """Defaults, then site.toml, then portal.toml (``AIPORTAL_CONFIG``), then ``AIPORTAL_*``."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        site = Path(site_path or environ.get("AIPORTAL_SITE_CONFIG") or DEFAULT_SITE)
        if site.exists():
            public = _read_toml(site)
            leaked = sorted(k for k in public if k in SECRETS)
            if leaked:
                raise ConfigError("%s holds %s: site.toml is readable by every user; move secrets to "
                                  "portal.toml (root only)" % (site, ", ".join(leaked)))
            values.update(public)
        path = path or environ.get("AIPORTAL_CONFIG") or DEFAULT_CONFIG
        p = Path(path)
        if p.exists() and (require_secrets or os.access(p, os.R_OK)):
            values.update(_read_toml(p))
        elif require_secrets:
            raise ConfigError("settings file %s does not exist; set AIPORTAL_CONFIG to the "
                              "portal.toml written by the portal Ansible role" % p)
        names = {f.name for f in fields(cls)}
        for key, value in environ.items():
            if key.startswith("AIPORTAL_") and key[9:].lower() in names:
                values[key[9:].lower()] = value
        return cls.from_mapping(values, source=str(p), require_secrets=require_secrets)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "settings",
                     require_secrets: bool = True) -> "Settings":
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError("%s: unknown settings %s" % (source, ", ".join(sorted(unknown))))
        for required in ("secret_key", "admin_token_sha256", "data_key") if require_secrets else ():
            if not values.get(required):
                raise ConfigError("%s: '%s' is missing; there is no default for secrets "
                                  "(the portal Ansible role generates it)" % (source, required))
        kw = dict(values)
        if "node_types" in kw:
            kw["node_types"] = {name: t if isinstance(t, NodeType) else NodeType(name=name, **t)
                                for name, t in kw["node_types"].items()}
        types = {f.name: f.type for f in fields(cls)}
        for name, value in list(kw.items()):
            kind = types.get(name)
            try:
                if kind == "float":
                    kw[name] = float(value)
                elif kind == "int":
                    kw[name] = int(value)
                elif kind == "bool" and isinstance(value, str):
                    if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError("not a boolean")
                    kw[name] = value.lower() in ("1", "true", "yes")
                elif kind.startswith("tuple[str") and not isinstance(value, tuple):
                    kw[name] = tuple(v for v in (value.split(",") if isinstance(value, str) else value) if v)
            except (TypeError, ValueError) as e:
                raise ConfigError("%s: %s = %r is not a valid %s" % (source, name, value, kind)) from e
        return cls(**kw)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError("cannot read settings file %s: %s" % (path, e)) from e

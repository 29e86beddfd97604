"""One typed, frozen settings object, built at the entry points and passed down.

Sources, later wins: built-in defaults, site.toml, the TOML file named by ``AIPORTAL_CONFIG``
(or passed in), then ``AIPORTAL_*`` environment variables. Nothing else in aiportal reads the
environment. Secrets have no defaults: a missing ``secret_key`` or admin token hash stops start-up.

The health check's settings are one nested object, ``Settings.health`` (a
:class:`monitor.config.HealthConfig`, declared once there): the ``[health]`` table of the TOML
files, ``AIPORTAL_HEALTH_<FIELD>`` in the environment. Its ``slurm_conf`` and ``shared_root``
are always the top-level settings of the same name (written once by the site admin).
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from monitor.config import HealthConfig
from portal.errors import ConfigError
from slurm.spec import NodeType

DEFAULT_SITE = "/etc/aiportal/site.toml"
#: settings that are secrets: never in site.toml (world-readable), only in portal.toml (root)
SECRETS = ("secret_key", "admin_token_sha256", "data_key", "notify_webhook_secret", "notify_smtp_password")
DEFAULT_CONFIG = "/etc/aiportal/portal.toml"
#: fields of Settings.health that are the top-level settings of the same name (never in [health])
HEALTH_SHARED = ("slurm_conf", "shared_root")
_HEALTH_ENV = "AIPORTAL_HEALTH_"


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
    #: a web session ends after this long without a request (its last-seen time is written at
    #: most once a minute, so it may last up to a minute longer)
    session_idle_s: float = 8 * 3600.0
    #: and this long after its login, however busy (absolute timeout)
    session_max_age_s: float = 7 * 86400.0
    #: wrong ``Authorization: Bearer`` tokens: after this many from one client address within
    #: token_failure_window_s, that address's API calls get 429 until the window has passed
    token_failures_per_address: int = 20
    token_failure_window_s: int = 300
    shared_root: str = "/srv/aiportal/shared"
    slurm_conf: str = "/etc/slurm/slurm.conf"
    cluster_name: str = "aiportal"
    slurm_timeout_s: float = 15.0
    #: a job stored but not in Slurm after this long is submitted again by the reconciler
    submit_grace_s: float = 120.0
    #: a job stored while Slurm's controller did not answer is tried again this often
    submit_retry_s: float = 10.0
    #: a run whose job folder records its end while Slurm still shows it running this much later
    #: ended unheard (a controller restarted from older state): recorded, and cancelled in Slurm
    unheard_end_grace_s: float = 60.0
    reconcile_interval_s: float = 2.0
    #: a create request with an Idempotency-Key still unanswered after this long is taken to have
    #: died: a retry answers with what it stored, or runs it again (portal/services/idempotency.py)
    idempotency_in_flight_s: float = 30.0
    stage_bin: str = "aiportal"
    # -- "finish stage-out" (docs/storage.md): a Slurm job runs `aiportal stage out` as the job's user --
    #: the partition it runs on ("" = the job's own)
    stage_finish_partition: str = ""
    stage_finish_time_limit: str = "01:00:00"
    #: an ended job's credentials file is removed this many days after its end, even while a
    #: stage-out is pending (finishing it later writes a fresh one); 0 keeps them for ever
    job_credentials_keep_days: float = 7.0
    image_cache: str = "/srv/aiportal/shared/images/cache"
    image_builder_user: str = "aiportal-img"
    image_build_partition: str = "gpu-1card"
    # -- OCI registries (docs/images.md) --
    #: the site's registry; its ``site/`` namespace holds the base images everyone may use
    site_registry: str = "localhost:5000"
    #: the base images published there: tag, digest, what is in each (ansible role site_images)
    site_images_file: str = "/srv/aiportal/shared/images/site-images.json"
    #: the account the portal reads the site's base images with (for users who have none there)
    site_registry_user: str = "aiportal-site"
    site_registry_password_file: str = "/etc/aiportal/secrets/registry_password_aiportal-site"
    #: registries spoken to over plain HTTP (no TLS); the others are verified with this bundle
    registry_insecure: tuple[str, ...] = ()
    #: registries users may add accounts for and pull from, besides site_registry and the
    #: registry_insecure hosts (e.g. ["docker.io"] at a site that lets users pull from Docker Hub);
    #: the portal connects to no other host a user names
    registries_allowed: tuple[str, ...] = ()
    registry_ca_file: str = "/etc/ssl/certs/ca-certificates.crt"
    registry_timeout_s: float = 10.0
    #: how long a user's right to read a cached private image is trusted before the registry is asked again
    registry_access_ttl_s: float = 60.0
    # -- Dockerfile builds (docs/builds.md): a Slurm job on image_build_partition runs buildah as the user --
    #: the node-local buildah storage of each user ({user} filled in; 0700, the user's own; under a
    #: sticky world-writable folder such as /var/tmp, so users create their own): vfs on NFS is slow
    image_build_storage: str = "/var/tmp/aiportal-build-{user}"
    #: buildah's storage driver: overlay (Linux >= 5.11, rootless; fast) or vfs (anywhere; slow)
    image_build_storage_driver: str = "overlay"
    #: the aiportal command the build job runs (`aiportal image build-run`); "" = stage_bin
    image_build_bin: str = ""
    #: the uploaded context tar at most (MB), and the unpacked context
    image_build_context_limit_mb: int = 2048
    #: the user's build storage at most while a build runs (MB; over it the build fails and the storage is wiped)
    image_build_storage_limit_mb: int = 20480
    #: RLIMIT_NPROC of the build (counts the user's processes on the node): bounds fork bombs
    image_build_max_processes: int = 4096
    #: the build job's CPUs and time limit; the runner stops buildah after image_build_timeout_s
    image_build_cpus: int = 2
    image_build_time_limit: str = "02:00:00"
    image_build_timeout_s: float = 6600.0
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
    #: a public service takes calls without a token at most this often a second from one client
    #: address, and this many at once (then 429 with Retry-After)
    public_rate_per_s: float = 5.0
    public_burst: int = 20

    # -- health checks: the [health] table of site.toml (every node reads it; docs/health.md) --
    health: HealthConfig = field(default_factory=HealthConfig)

    # -- the monitor daemon (portal host): recovery and notifications --
    monitor_interval_s: float = 3.0
    #: a requeued job whose begin time is at most this far ahead is released at once (Slurm's
    #: requeue hold is ~120 s; a user's own --begin further ahead is left alone)
    monitor_release_within_s: float = 300.0
    #: the portal's address (site.toml): the CLI's default --url, links in notifications; https
    #: makes the session cookie Secure
    portal_url: str = "http://127.0.0.1:8000"
    #: the CA bundle the CLI checks the portal's certificate against; "" is the system's
    portal_ca_file: str = ""
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

    def __post_init__(self) -> None:
        for name in ("session_idle_s", "session_max_age_s", "token_failures_per_address", "token_failure_window_s",
                     "public_rate_per_s", "public_burst"):
            if getattr(self, name) <= 0:
                raise ConfigError("%s = %r: must be more than 0" % (name, getattr(self, name)))
        # the health check's copies of the shared settings are always these (typed once)
        if (self.health.slurm_conf, self.health.shared_root) != (self.slurm_conf, self.shared_root):
            object.__setattr__(self, "health", replace(self.health, slurm_conf=self.slurm_conf,
                                                       shared_root=self.shared_root))

    @property
    def served_over_https(self) -> bool:
        return self.portal_url.lower().startswith("https://")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None,
             require_secrets: bool = True, site_path: str | os.PathLike | None = None) -> "Settings":
        """Defaults, then site.toml, then portal.toml (``AIPORTAL_CONFIG``), then ``AIPORTAL_*``."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        health: dict[str, Any] = {}
        read: list[str] = []
        site = Path(site_path or environ.get("AIPORTAL_SITE_CONFIG") or DEFAULT_SITE)
        if site.exists():
            public = _read_toml(site)
            leaked = sorted(k for k in public if k in SECRETS)
            if leaked:
                raise ConfigError("%s holds %s: site.toml is readable by every user; move secrets to "
                                  "portal.toml (root only)" % (site, ", ".join(leaked)))
            health.update(_health_table(public, site))
            values.update(public)
            read.append(str(site))
        path = path or environ.get("AIPORTAL_CONFIG") or DEFAULT_CONFIG
        p = Path(path)
        try:
            exists = p.exists()
        except PermissionError:         # a folder the caller cannot look into (jobs of other users)
            exists = require_secrets
        if exists and (require_secrets or os.access(p, os.R_OK)):
            own = _read_toml(p)
            health.update(_health_table(own, p))
            values.update(own)
            read.append(str(p))
        elif require_secrets:
            raise ConfigError("settings file %s does not exist; set AIPORTAL_CONFIG to the "
                              "portal.toml written by the portal Ansible role" % p)
        names = {f.name for f in fields(cls)} - {"health"}
        health_names = {f.name for f in fields(HealthConfig)} - set(HEALTH_SHARED)
        for key, value in environ.items():
            if key.startswith(_HEALTH_ENV):
                name = key[len(_HEALTH_ENV):].lower()
                if name in HEALTH_SHARED:
                    raise ConfigError("%s: the health check uses the site's %s; set AIPORTAL_%s instead"
                                      % (key, name, name.upper()))
                if name not in health_names:
                    raise ConfigError("%s is not a health setting; known: %s" % (
                        key, ", ".join(_HEALTH_ENV + n.upper() for n in sorted(health_names))))
                health[name] = value
            elif key.startswith("AIPORTAL_") and key[9:].lower() in names:
                values[key[9:].lower()] = value
        if health:
            values["health"] = health
        source = " + ".join(read + ["AIPORTAL_* environment"])
        return cls.from_mapping(values, source=source, require_secrets=require_secrets)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "settings",
                     require_secrets: bool = True) -> "Settings":
        """Typed settings from TOML-like ``values`` (``health`` a table of :class:`HealthConfig`
        fields, or a HealthConfig); strings from the environment are converted, errors name the
        setting."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError("%s: unknown settings %s%s" % (source, ", ".join(sorted(unknown)), _moved(unknown)))
        for required in ("secret_key", "admin_token_sha256", "data_key") if require_secrets else ():
            if not values.get(required):
                raise ConfigError("%s: '%s' is missing; there is no default for secrets "
                                  "(the portal Ansible role generates it)" % (source, required))
        kw = dict(values)
        if "node_types" in kw:
            kw["node_types"] = {name: t if isinstance(t, NodeType) else NodeType(name=name, **t)
                                for name, t in kw["node_types"].items()}
        health = kw.pop("health", {})
        kw = _typed(kw, {f.name: str(f.type) for f in fields(cls)}, source, "")
        if isinstance(health, Mapping):
            health = _health_config(health, source)
        elif not isinstance(health, HealthConfig):
            raise ConfigError("%s: health must be a table ([health] in site.toml), got %r" % (source, health))
        return cls(**kw, health=health)


def _health_table(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """Take the ``[health]`` table out of one TOML document, refusing the shared settings in it."""
    table = doc.pop("health", {})
    if not isinstance(table, dict):
        raise ConfigError("%s: health must be a table ([health] with one setting per line), got %r" % (path, table))
    for name in HEALTH_SHARED:
        if name in table:
            raise ConfigError("%s: [health] %s: the health check uses the site's %s; set it once, at the top of the "
                              "file (before any [table]), and remove it from [health]" % (path, name, name))
    return table


def _health_config(table: Mapping[str, Any], source: str) -> HealthConfig:
    known = {f.name: str(f.type) for f in fields(HealthConfig) if f.name not in HEALTH_SHARED}
    unknown = set(table) - set(known)
    if unknown:
        raise ConfigError("%s: unknown settings in [health]: %s; known: %s"
                          % (source, ", ".join(sorted(unknown)), ", ".join(sorted(known))))
    try:
        return HealthConfig(**_typed(dict(table), known, source, "health."))
    except ValueError as e:
        raise ConfigError("%s: %s" % (source, e)) from e


def _moved(unknown: set[str]) -> str:
    """The fix for flat ``health_*`` settings of older site.toml files."""
    old = sorted(n for n in unknown if n.startswith("health_"))
    if not old:
        return ""
    return ("; the health settings moved into the [health] table: write %s (`make provision` rewrites site.toml)"
            % ", ".join("%s as %s" % (n, n[len("health_"):]) for n in old))


def _typed(kw: dict[str, Any], types: Mapping[str, str], source: str, prefix: str) -> dict[str, Any]:
    """``kw`` with strings (environment) and TOML values converted to the fields' types."""
    for name, value in list(kw.items()):
        kind = types.get(name, "")
        try:
            if kind in ("float", "int") and isinstance(value, bool):
                raise ValueError("a boolean is not a number")
            if kind == "float":
                kw[name] = float(value)
            elif kind == "int":
                if isinstance(value, float):
                    raise ValueError("not a whole number")
                kw[name] = int(value)
            elif kind == "bool" and isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError("not a boolean")
                kw[name] = value.lower() in ("1", "true", "yes")
            elif kind == "bool" and not isinstance(value, bool):
                raise ValueError("not a boolean")
            elif kind.startswith("tuple[") and not isinstance(value, tuple):
                items = value.split(",") if isinstance(value, str) else list(value)
                item = int if kind.startswith("tuple[int") else str
                kw[name] = tuple(item(v.strip() if isinstance(v, str) else v) for v in items if v != "")
        except (TypeError, ValueError) as e:
            raise ConfigError("%s: %s%s = %r is not a valid %s" % (source, prefix, name, value, kind)) from e
    return kw


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError("cannot read settings file %s: %s" % (path, e)) from e

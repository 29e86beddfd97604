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

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None,
             require_secrets: bool = True, site_path: str | os.PathLike | None = None) -> "Settings":
        """Defaults, then site.toml, then portal.toml (``AIPORTAL_CONFIG``), then ``AIPORTAL_*``."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        site = Path(site_path or environ.get("AIPORTAL_SITE_CONFIG") or DEFAULT_SITE)
        if site.exists():
            values.update(_read_toml(site))
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
        for name in ("slurm_timeout_s", "submit_grace_s", "reconcile_interval_s"):
            if name in kw:
                kw[name] = float(kw[name])
        if "log_ssh_port" in kw:
            kw["log_ssh_port"] = int(kw["log_ssh_port"])
        return cls(**kw)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError("cannot read settings file %s: %s" % (path, e)) from e

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

DEFAULT_CONFIG = "/etc/aiportal/portal.toml"


DEFAULT_NODE_TYPES = {
    "1card": NodeType("1card", "gpu-1card", 1, "p40", 8, 32000),
    "4card": NodeType("4card", "gpu-4card", 4, "p40", 48, 256000),
    "infer": NodeType("infer", "infer", 1, "p40", 8, 32000),
}


@dataclass(frozen=True)
class Settings:
    secret_key: str
    admin_token_sha256: str
    database_url: str = "sqlite:////var/lib/aiportal/portal.db"
    bind: str = "127.0.0.1:8000"
    shared_root: str = "/srv/aiportal/shared"
    slurm_conf: str = "/etc/slurm/slurm.conf"
    cluster_name: str = "aiportal"
    slurm_timeout_s: float = 15.0
    node_types: Mapping[str, NodeType] = field(default_factory=lambda: dict(DEFAULT_NODE_TYPES))

    @classmethod
    def load(cls, path: str | os.PathLike | None = None,
             environ: Mapping[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        path = path or environ.get("AIPORTAL_CONFIG") or DEFAULT_CONFIG
        values: dict[str, Any] = {}
        p = Path(path)
        if p.exists():
            try:
                values.update(tomllib.loads(p.read_text()))
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ConfigError("cannot read settings file %s: %s" % (p, e)) from e
        elif path != DEFAULT_CONFIG:
            raise ConfigError("settings file %s does not exist; set AIPORTAL_CONFIG to the "
                              "portal.toml written by the portal Ansible role" % p)
        names = {f.name for f in fields(cls)}
        for key, value in environ.items():
            if key.startswith("AIPORTAL_") and key[9:].lower() in names:
                values[key[9:].lower()] = value
        return cls.from_mapping(values, source=str(p))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "settings") -> "Settings":
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError("%s: unknown settings %s" % (source, ", ".join(sorted(unknown))))
        for required in ("secret_key", "admin_token_sha256"):
            if not values.get(required):
                raise ConfigError("%s: '%s' is missing; there is no default for secrets "
                                  "(the portal Ansible role generates it)" % (source, required))
        kw = dict(values)
        if "node_types" in kw:
            kw["node_types"] = {name: t if isinstance(t, NodeType) else NodeType(name=name, **t)
                                for name, t in kw["node_types"].items()}
        if "slurm_timeout_s" in kw:
            kw["slurm_timeout_s"] = float(kw["slurm_timeout_s"])
        return cls(**kw)

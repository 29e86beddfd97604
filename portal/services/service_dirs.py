"""A service's folders on the shared filesystem: ``SHARED/services/SERVICE_ID/`` (owned by the
user's Unix account, mode 0700; the portal, root, reads it) holds ``runtime.py`` (a copy of
:mod:`inference.runtime`, bound read-only into each replica) and
``replicas/REPLICA_ID/{data,run,logs}``: the staged model, the runtime's config and
``endpoint.json``, the job log."""
from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
from pathlib import Path
from typing import Any, Mapping


import inference.runtime
from portal.settings import Settings

log = logging.getLogger(__name__)


def _own(path: Path, pw) -> None:
    if os.geteuid() == 0:
        os.chown(path, pw.pw_uid, pw.pw_gid)


def prepare_service_dir(settings: Settings, unix_user: str, service_dir: Path) -> None:
    """The service's folder, private to its user (the portal reads it as root)."""
    pw = pwd.getpwnam(unix_user)
    (Path(settings.shared_root) / "services").mkdir(mode=0o755, exist_ok=True)
    for d in (service_dir, service_dir / "replicas"):
        d.mkdir(mode=0o700, exist_ok=True)
        _own(d, pw)


def install_runtime(service_dir: Path, pw) -> Path:
    """A copy of the serving runtime in the service's folder (replicas bind it read-only); a
    new portal version's runtime reaches new replicas."""
    dest = service_dir / "runtime.py"
    src = Path(inference.runtime.__file__)
    if not dest.exists() or dest.read_bytes() != src.read_bytes():
        tmp = service_dir / ".runtime.py.tmp"
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        _own(tmp, pw)
        os.replace(tmp, dest)
    return dest


def write_runtime_config(path: Path, pw, config: Mapping[str, Any]) -> None:
    """The replica's runtime.json: mode 0600 from its creation (it holds the service's key),
    owned by the user, written whole (temporary file + rename)."""
    tmp = path.with_name(".%s.tmp" % path.name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)        # an older file of that name kept its mode
        json.dump(config, f, indent=1)
    _own(tmp, pw)
    os.replace(tmp, path)


def prepare_replica_dir(settings: Settings, unix_user: str, service_dir: Path, replica_id: str) -> Path:
    pw = pwd.getpwnam(unix_user)
    prepare_service_dir(settings, unix_user, service_dir)
    job_dir = service_dir / "replicas" / replica_id
    for d in (job_dir, job_dir / "data", job_dir / "output", job_dir / "logs", job_dir / "run"):
        d.mkdir(mode=0o700, exist_ok=True)
        _own(d, pw)
    return job_dir



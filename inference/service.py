"""A service's specification and the batch job of one of its replicas: pure functions.

A :class:`ServiceSpec` is what a rolling update replaces (image, model, class, resources,
version, batching); how many replicas run is the service's scaling policy
(:class:`ScalePolicy`). :func:`replica_job` turns a spec into the replica's
:class:`slurm.spec.JobSpec` and the serving runtime's config: a Slurm job on the ``infer``
node type, ``--time=UNLIMITED``, not requeued by Slurm (the controller replaces replicas
itself), that stages the model into ``/data/data`` like a training input and runs
``python3 /aiportal/runtime.py`` in the image with the runtime bound read-only.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import PurePosixPath
from typing import Any, Mapping

from containers.apptainer import job_exec_prefix
from inference.errors import ServiceSpecError
from slurm.spec import JOB_DATA_DIR, JOB_OUTPUT_DIR, JobSpec, NodeType

NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])?$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
#: where the replica's folders appear inside the container
RUNTIME_IN_CONTAINER = "/aiportal/runtime.py"
RUN_IN_CONTAINER = "/aiportal/run"
MODEL_IN_CONTAINER = "/data/data"
RUNTIME_CONFIG = "runtime.json"
PORT_RANGE = (7000, 7999)        # DESIGN.md port plan: inference replicas
#: the largest ``max_body_bytes`` a service may have: the web server in front takes no larger
#: body for /service/ (nginx.conf.j2) and the gateway reads and discards up to this much of a
#: refused request's body (inference/gateway/server.py)
MAX_BODY_BYTES = 1024 * 1024 * 1024


@dataclass(frozen=True)
class ServiceSpec:
    """What one version of a service runs."""

    image: str                    #: a .sif path on the shared filesystem
    model: str                    #: s3://SOURCE/bucket/prefix or a shared path; staged into /data/data
    model_file: str = "model.py"  #: the file defining the class, relative to the model location
    class_name: str = "Model"
    version: str = "1"
    gpus: int = 0
    cpus: int = 1
    memory_mb: int = 2000
    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    max_body_bytes: int = 16 * 1024 * 1024

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.image, str) or not self.image.startswith("/") or not self.image.endswith(".sif"):
            raise ServiceSpecError("image", "give the absolute path of a .sif image on the shared filesystem "
                                            "(register archives on the Images page first)")
        if not isinstance(self.model, str) or not self.model.strip() or "\n" in self.model:
            raise ServiceSpecError("model", "give the model location: s3://SOURCE/bucket/prefix or a shared path")
        mf = PurePosixPath(self.model_file) if isinstance(self.model_file, str) else None
        if mf is None or not self.model_file or mf.is_absolute() or ".." in mf.parts or not self.model_file.endswith(".py"):
            raise ServiceSpecError("model_file", "a .py file inside the model location, e.g. model.py")
        if not isinstance(self.class_name, str) or not self.class_name.isidentifier():
            raise ServiceSpecError("class_name", "a Python class name, e.g. Model")
        if not isinstance(self.version, str) or not VERSION_RE.match(self.version):
            raise ServiceSpecError("version", "1-64 letters, digits, '.', '_', '+' or '-'")
        for name, lo, hi in (("gpus", 0, 8), ("cpus", 1, 64), ("memory_mb", 100, 1024 * 1024),
                             ("max_batch_size", 1, 1024), ("max_body_bytes", 1, MAX_BODY_BYTES)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ServiceSpecError(name, "a whole number from %d to %d" % (lo, hi))
        if isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, (int, float)) \
                or not 0 <= self.max_wait_ms <= 10000:
            raise ServiceSpecError("max_wait_ms", "a number of milliseconds from 0 to 10000")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> "ServiceSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ServiceSpecError("body", "unknown fields %s" % ", ".join(sorted(map(str, unknown))))
        for req in ("image", "model"):
            if req not in raw:
                raise ServiceSpecError(req, "is required")
        kw = dict(raw)
        if isinstance(kw.get("max_wait_ms"), int) and not isinstance(kw.get("max_wait_ms"), bool):
            kw["max_wait_ms"] = float(kw["max_wait_ms"])
        return cls(**kw)


@dataclass(frozen=True)
class ScalePolicy:
    """How many replicas, and when to add or remove one."""

    min_replicas: int = 1
    max_replicas: int = 1
    #: requests in flight per replica the autoscaler aims at (measured on the replicas)
    target_inflight: float = 4.0
    #: load must stay low this long before a replica is removed
    scale_down_delay_s: float = 60.0

    def __post_init__(self):
        for name in ("min_replicas", "max_replicas"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 64:
                raise ServiceSpecError(name, "a whole number from 0 to 64")
        if self.max_replicas < self.min_replicas or self.max_replicas < 1:
            raise ServiceSpecError("max_replicas", "at least 1 and at least min_replicas (%d)" % self.min_replicas)
        for name, lo, hi in (("target_inflight", 0.1, 10000), ("scale_down_delay_s", 0, 86400)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise ServiceSpecError(name, "a number from %g to %g" % (lo, hi))


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ServiceSpecError("name", "1-48 lower-case letters, digits and '-', starting and ending with a "
                                       "letter or digit (it becomes the URL /service/NAME)")
    return name


def runtime_config(spec: ServiceSpec, *, job_id: str = "", bind_host: str = "127.0.0.1",
                   port_range: tuple[int, int] = PORT_RANGE, key: str | None = None) -> dict[str, Any]:
    """The serving runtime's config for a replica of ``spec`` (paths as the container sees them).
    ``key``: the service's key in clear; the replica then answers only requests that carry it
    (the file must stay private to the service's user)."""
    return {
        "model_file": "%s/%s" % (MODEL_IN_CONTAINER, spec.model_file), "class_name": spec.class_name,
        "model_dir": MODEL_IN_CONTAINER, "max_batch_size": spec.max_batch_size,
        "max_wait_ms": float(spec.max_wait_ms), "max_body_bytes": spec.max_body_bytes,
        "port_range": list(port_range), "bind_host": bind_host,
        "endpoint_file": "%s/endpoint.json" % RUN_IN_CONTAINER, "version": spec.version, "job_id": job_id or None,
        "key": key or None,
    }


def replica_job(spec: ServiceSpec, node_type: NodeType, *, service: str, replica_id: str, job_dir: str,
                runtime_path: str, stage_bin: str = "aiportal", credentials_file: str | None = None,
                apptainer: str = "apptainer") -> JobSpec:
    """The batch job of one replica. ``job_dir`` holds ``data/`` (the staged model), ``run/``
    (runtime.json, endpoint.json; bound at /aiportal/run) and ``logs/``; ``runtime_path`` is the
    runtime file on the shared filesystem, bound read-only at /aiportal/runtime.py."""
    if spec.gpus > node_type.gpus:
        raise ServiceSpecError("gpus", "node type %s has %d GPU(s) per node" % (node_type.name, node_type.gpus))
    return JobSpec(
        name="svc-%s" % service, partition=node_type.partition, image=spec.image,
        command=("python3", RUNTIME_IN_CONTAINER, "--config", "%s/%s" % (RUN_IN_CONTAINER, RUNTIME_CONFIG)),
        job_dir=job_dir, gpus=spec.gpus, gpu_type=node_type.gpu_type if spec.gpus else None, cpus=spec.cpus,
        memory_mb=spec.memory_mb, time_limit="UNLIMITED", inputs=(spec.model,), requeue=False,
        checkpoint_signal=None, portal_id="service:%s" % replica_id, stage_bin=stage_bin,
        credentials_file=credentials_file,
        container=job_exec_prefix(JOB_DATA_DIR, JOB_OUTPUT_DIR, nv=spec.gpus > 0, apptainer=apptainer, binds=(
            ("%s/run" % job_dir, RUN_IN_CONTAINER, "rw"), (runtime_path, RUNTIME_IN_CONTAINER, "ro"))))

"""Inference services' models: deploy (:class:`ServiceCreate`), a new version or gray-release
weight (:class:`ServiceUpdate`), scaling (:class:`ServiceScale`), and a service with its replicas
as the API shows it (:class:`ServicePublic`). Shapes and types are checked here; what a spec's
values mean (names, paths, resources) is :class:`inference.service.ServiceSpec`'s to check."""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import ConfigDict, Field
from sqlmodel import SQLModel

from inference.controller import Phase
from inference.service import MAX_BODY_BYTES, NAME_RE, VERSION_RE
from portal.models.common import OptionalTimestamp, Timestamp
from portal.models.tables import Service, ServiceReplica

_STRICT = ConfigDict(extra="forbid", strict=True)


class ServiceSpecFields(SQLModel):
    """What a version of a service runs (all optional here: an update changes only those given)."""

    model_config = _STRICT

    image: str = Field(default=None, description="a .sif path on the shared filesystem")
    model: str = Field(default=None, description="the model folder: s3://SOURCE/bucket/prefix or a shared "
                                                        "path, staged into /data/data")
    model_file: str = Field(default=None, description="the .py file with the model class, in the model "
                                                             "folder (default model.py)")
    class_name: str = Field(default=None, description="the class: load_model(self), "
                                                             "execute(self, data, batch_size)")
    version: str = Field(default=None, json_schema_extra={"pattern": VERSION_RE.pattern})
    # the ranges inference.service.ServiceSpec checks, as the document states them
    gpus: int = Field(default=None, json_schema_extra={"minimum": 0, "maximum": 8})
    cpus: int = Field(default=None, json_schema_extra={"minimum": 1, "maximum": 64})
    memory_mb: int = Field(default=None, json_schema_extra={"minimum": 100, "maximum": 1048576})
    max_batch_size: int = Field(default=None, json_schema_extra={"minimum": 1, "maximum": 1024})
    max_wait_ms: float = Field(default=None, json_schema_extra={"minimum": 0, "maximum": 10000})
    max_body_bytes: int = Field(default=None, json_schema_extra={"minimum": 1, "maximum": MAX_BODY_BYTES})


class ServicePolicyFields(SQLModel):
    model_config = _STRICT

    replicas: int | None = Field(default=None, description="a fixed count (min = max)", json_schema_extra={"minimum": 0, "maximum": 64})
    min_replicas: int | None = Field(default=None, ge=0, le=64)
    max_replicas: int | None = Field(default=None, ge=1, le=64)
    target_inflight: float | None = Field(default=None, description="requests in flight per replica the "
                                                                    "autoscaler aims at", json_schema_extra={"minimum": 0.1, "maximum": 10000})
    scale_down_delay_s: float | None = Field(default=None, description="seconds of low load before a replica "
                                                                       "is removed", json_schema_extra={"minimum": 0, "maximum": 86400})


class ServiceCreate(ServiceSpecFields, ServicePolicyFields):
    """Deploy a service: replicas on the infer partition behind POST|PUT /service/NAME."""

    name: str = Field(description="lower-case letters, digits, '-': the URL /service/NAME",
                      json_schema_extra={"pattern": NAME_RE.pattern})
    image: str = Field(description="a .sif path on the shared filesystem")
    model: str = Field(description="the model folder: s3://SOURCE/bucket/prefix or a shared path")
    public: bool = Field(default=False, description=(
        "callable by anyone without a token (a rate limit per client address holds it); default: only "
        "with a token of yours (or an invoke key)"))


class ServiceUpdate(ServiceSpecFields):
    """The fields to change; the rest stay as they are."""

    weight: int | None = Field(default=None, description="gray release: with spec fields (1-99), the new "
                               "version runs beside the current one for this share of the requests; alone, "
                               "changes that share (100 rolls the new version out, 0 stops it)")


class ServiceScale(ServicePolicyFields):
    """The replica count, or the autoscaling range."""


class ServiceAccess(SQLModel):
    """Who may call a service."""

    model_config = _STRICT
    public: bool = Field(description="true: anyone, without a token (rate-limited per client address); "
                                     "false: only with a token of the owner's (or an invoke key)")


class ReplicaPublic(SQLModel):
    id: str
    phase: Literal[tuple(p.value for p in Phase)]  # type: ignore[valid-type]
    version: str
    generation: int
    slurm_job_id: str | None = None
    host: str | None = None
    port: int | None = None
    avg_inflight: float | None = None
    message: str
    created_at: Timestamp
    ready_at: OptionalTimestamp = None
    ended_at: OptionalTimestamp = None

    @classmethod
    def of(cls, r: ServiceReplica) -> "ReplicaPublic":
        return cls(id=r.id, phase=r.phase.value, version=r.version, generation=r.generation,
                   slurm_job_id=r.slurm_job_id, host=r.host, port=r.port,
                   avg_inflight=None if r.avg_inflight is None else round(r.avg_inflight, 3), message=r.message,
                   created_at=r.created_at, ready_at=r.ready_at, ended_at=r.ended_at)


class ServicePublic(SQLModel):
    id: str
    name: str
    owner: str | None = None
    state: Literal["RUNNING", "UPDATING", "DELETING"] = Field(description=(
        "RUNNING; UPDATING: a new version rolls out or runs beside the current one; DELETING: "
        "DELETE was accepted (202) and the controller is stopping its replicas: it still answers "
        "GET until the last replica has ended, then the service is gone (404)"))
    url: str
    spec: dict[str, Any]
    generation: int
    version: str | None = None
    next_spec: dict[str, Any] | None = None
    next_weight: int | None = None
    min_replicas: int
    max_replicas: int
    desired_replicas: int
    target_inflight: float
    scale_down_delay_s: float
    public: bool = Field(default=False, description="callable without a token (rate-limited per client address)")
    message: str
    created_at: Timestamp
    updated_at: Timestamp
    ready_replicas: int
    replicas: list[ReplicaPublic]

    @classmethod
    def of(cls, svc: Service, replicas: list[ServiceReplica], owner: str | None = None) -> "ServicePublic":
        spec = svc.spec
        return cls(id=svc.id, name=svc.name, owner=owner, state=svc.state.value, url="/service/%s" % svc.name,
                   spec=spec, generation=svc.generation, version=spec.get("version"),
                   next_spec=json.loads(svc.next_spec_json) if svc.next_spec_json else None,
                   next_weight=svc.next_weight, min_replicas=svc.min_replicas, max_replicas=svc.max_replicas,
                   desired_replicas=svc.desired, target_inflight=svc.target_inflight,
                   scale_down_delay_s=svc.scale_down_delay_s, public=svc.public, message=svc.message,
                   created_at=svc.created_at,
                   updated_at=svc.updated_at, ready_replicas=sum(1 for r in replicas if r.phase is Phase.READY),
                   replicas=[ReplicaPublic.of(r) for r in replicas])


class ServiceList(SQLModel):
    services: list[ServicePublic]

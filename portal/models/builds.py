"""Dockerfile builds' models: a build as the API shows it (:class:`BuildPublic`) and a list of
them. A build is started with a context tar in the body (``application/x-tar``) and the tag and
Dockerfile in the query, so it has no JSON create model."""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from sqlmodel import SQLModel

from portal.models.common import OptionalTimestamp, Timestamp
from portal.models.tables import ImageBuild


class BuildPublic(SQLModel):
    id: int
    owner: str | None = None
    tag: str
    state: Literal["PENDING", "RUNNING", "PUSHED", "FAILED", "CANCELLED"]
    digest: str = Field(description="the pushed manifest's digest (sha256:...) once PUSHED, else ''")
    pinned: str = Field(description="REGISTRY/REPO@sha256:... once PUSHED, else ''")
    slurm_job_id: str | None = None
    message: str
    log_url: str
    created_at: Timestamp
    updated_at: Timestamp
    ended_at: OptionalTimestamp = None

    @classmethod
    def of(cls, b: ImageBuild, owner: str | None = None) -> "BuildPublic":
        pinned = ""
        if b.digest:
            repo = b.tag.rsplit(":", 1)[0] if ":" in b.tag.rsplit("/", 1)[-1] else b.tag
            pinned = "%s@%s" % (repo, b.digest)
        return cls(id=b.id, owner=owner, tag=b.tag, state=b.state.value, digest=b.digest, pinned=pinned,
                   slurm_job_id=b.slurm_job_id, message=b.message, log_url="/api/v1/images/builds/%d/log" % b.id,
                   created_at=b.created_at, updated_at=b.updated_at, ended_at=b.ended_at)


class BuildList(SQLModel):
    builds: list[BuildPublic]

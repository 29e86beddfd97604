"""Registries' models: add an account (:class:`RegistryLogin`; the password is checked at once
and sealed at rest, never answered), an account as the API shows it, the site's base images and
what the image pickers offer (:class:`ImageChoices`), the check of one reference as it is typed."""
from __future__ import annotations

from typing import ClassVar, Mapping

from pydantic import ConfigDict, Field
from sqlmodel import SQLModel

from portal.models.common import Timestamp
from portal.models.tables import RegistryCredential


class RegistryLogin(SQLModel):
    """An account at a registry (checked against it before it is stored)."""

    model_config = ConfigDict(extra="forbid")

    registry: str = Field(description="HOST[:PORT], e.g. localhost:5000", examples=["localhost:5000"])
    username: str
    password: str = Field(description="the password or an access token; stored sealed, never shown again")
    missing_messages: ClassVar[Mapping[str, str]] = {"registry": "name the registry, e.g. localhost:5000",
                                                     "username": "is required", "password": "is required"}


class RegistryPublic(SQLModel):
    registry: str
    username: str
    created_at: Timestamp
    checked_at: Timestamp = Field(description="when the registry last accepted the account")

    @classmethod
    def of(cls, row: RegistryCredential) -> "RegistryPublic":
        return cls(registry=row.host, username=row.username, created_at=row.created_at, checked_at=row.checked_at)


class RegistryList(SQLModel):
    registries: list[RegistryPublic]


class SiteImagePublic(SQLModel):
    name: str
    ref: str = Field(description="docker://HOST/site/NAME:TAG, what to put in a job's image field")
    digest: str
    title: str
    description: str
    framework: str


class RepositoryPublic(SQLModel):
    registry: str
    repository: str
    tags: list[str]
    refs: list[str] = Field(description="docker://REGISTRY/REPOSITORY:TAG for each tag")


class ImageChoices(SQLModel):
    """What an image field offers: the site's base images, the user's recent images, and the
    repositories and tags in each registry they added (with why a registry could not be listed)."""

    site: list[SiteImagePublic]
    recent: list[str]
    repositories: list[RepositoryPublic]
    problems: dict[str, str] = Field(description="registry -> why its repositories could not be listed")


class ImageCheck(SQLModel):
    """One reference checked as it is typed."""

    ref: str
    ok: bool
    pinned: str | None = Field(default=None, description="the reference at its digest, when it is a registry image")
    cached: bool = Field(default=False, description="converted already: a job starts without a conversion")
    sif: str | None = Field(default=None, description="the SIF a job runs, once converted")
    message: str = ""

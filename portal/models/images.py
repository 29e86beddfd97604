"""Images' models: register one by reference (:class:`ImageCreate`), an image as the API shows it
(:class:`ImagePublic`), what deleting one did (:class:`ImageDeletedPublic`), an entry of the shared
SIF cache (:class:`CacheEntryPublic`)."""
from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field
from sqlmodel import SQLModel

from portal.models.common import Timestamp
from portal.models.tables import Image


class ImageCreate(SQLModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    ref: str = Field(description="a .sif path, docker-archive:/PATH.tar or oci-archive:/PATH.tar")


class ImagePublic(SQLModel):
    id: int
    ref: str
    digest: str
    sif: str
    state: Literal["PENDING", "CONVERTING", "READY", "FAILED"]
    conversion_job_id: str | None = None
    message: str
    created_at: Timestamp
    updated_at: Timestamp

    @classmethod
    def of(cls, img: Image) -> "ImagePublic":
        return cls(id=img.id, ref=img.ref, digest=img.digest, sif=img.sif_path, state=img.state.value,
                   conversion_job_id=img.conversion_job_id, message=img.message, created_at=img.created_at,
                   updated_at=img.updated_at)


class ImageDeletedPublic(SQLModel):
    image: ImagePublic = Field(description="the image as it was")
    sif_removed: bool = Field(description="its SIF left the shared cache (only when nothing else uses it)")
    kept_because: list[str] = Field(description="why the SIF stays, when it does: other images, a site image, "
                                                "unfinished jobs or services that use it, a conversion under way, "
                                                "or a file outside the cache")


class ImageList(SQLModel):
    images: list[ImagePublic]


class CacheEntryPublic(SQLModel):
    digest: str
    path: str
    size_bytes: int
    last_used: float | None = None
    refs: list[str] = Field(description="the references converted to it (admins only)")


class CacheList(SQLModel):
    entries: list[CacheEntryPublic]

"""Data sources' models: register one (:class:`DataSourceCreate`; its keys are sealed at rest),
one as the API shows it (:class:`DataSourcePublic`: the access key masked, never the secret),
one level of a location (:class:`BrowsePage`)."""
from __future__ import annotations

import json

from pydantic import ConfigDict, Field, StrictBool
from sqlmodel import SQLModel

from portal.models.common import Timestamp
from portal.models.tables import DataSourceRecord


class DataSourceCreate(SQLModel):
    """A data source as the form and the API send it (values are checked by
    :func:`portal.services.datasources.parse_source`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="how job locations name it: s3://NAME/bucket/prefix")
    endpoint: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    buckets: list[str] | str | None = Field(default=None, description="bucket names (a list, or one string "
                                                                      "separated by spaces or commas)")
    bandwidth_mbps: float | str | None = Field(default=None, description="a cap per transfer, in Mbit/s")
    workers: int | str | None = Field(default=None, description="parallel transfers")
    check: StrictBool = Field(default=True, description="check that the keys open each bucket")


class DataSourcePublic(SQLModel):
    name: str
    endpoint: str
    region: str
    buckets: list[str]
    bandwidth_mbps: float | None = None
    workers: int | None = None
    access_key: str = Field(description="masked")
    created_at: Timestamp

    @classmethod
    def of(cls, rec: DataSourceRecord) -> "DataSourcePublic":
        return cls(name=rec.name, endpoint=rec.endpoint, region=rec.region,
                   buckets=json.loads(rec.buckets_json or "[]"), bandwidth_mbps=rec.bandwidth_mbps,
                   workers=rec.workers, access_key=rec.access_key_hint, created_at=rec.created_at)


class DataSourceList(SQLModel):
    datasources: list[DataSourcePublic]


class BrowseEntry(SQLModel):
    name: str
    uri: str
    is_dir: bool
    size: int | None = None
    last_modified: Timestamp = None


class BrowsePage(SQLModel):
    prefix: str
    next_token: str | None = None
    entries: list[BrowseEntry]

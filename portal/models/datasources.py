"""Data sources' models: register one (:class:`DataSourceCreate`; its keys are sealed at rest),
one as the API shows it (:class:`DataSourcePublic`: the access key masked, never the secret),
one level of a location (:class:`BrowsePage`)."""
from __future__ import annotations

import json

from typing import ClassVar, Mapping

from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from sqlmodel import SQLModel

from portal.models.common import OptionalTimestamp, Timestamp
from portal.models.tables import DataSourceRecord


class DataSourceCreate(SQLModel):
    """A data source as the form and the API send it (values are checked by
    :func:`portal.services.datasources.parse_source`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the data source's name")
    endpoint: str = Field(description="the store's URL, e.g. http://127.0.0.1:9000")
    region: str | None = None
    access_key: str
    secret_key: str
    buckets: list[str] | str | None = Field(default=None, description="bucket names (a list, or one string "
                                                                      "separated by spaces or commas)")
    bandwidth_mbps: StrictInt | StrictFloat | str | None = Field(default=None, description="a cap per transfer, in Mbit/s")
    workers: StrictInt | StrictFloat | str | None = Field(default=None, description="parallel transfers")
    missing_messages: ClassVar[Mapping[str, str]] = {"name": "give the data source a name",
                                                     "endpoint": "is required", "access_key": "is required",
                                                     "secret_key": "is required"}

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
    last_modified: OptionalTimestamp = None


class BrowsePage(SQLModel):
    prefix: str
    next_token: str | None = None
    entries: list[BrowseEntry]

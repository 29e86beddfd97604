"""Data sources: a user's S3-compatible stores, keys sealed at rest with the site's data key.

Responses never carry keys: :func:`public` gives the masked access key only. The clear
:class:`storage.credentials.DataSource` exists only in memory, for validation and for the
job's credentials file.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from sqlmodel import Session, select

from portal.errors import ConflictError, NotFoundError, ValidationError
from portal.models import DataSourceRecord, User
from portal.models.datasources import DataSourceCreate
from storage.credentials import DataSource, SecretBox, check_source, mask
import storage
from storage import Listing, StoreContext
from storage.errors import CredentialsError


def parse_source(name: str, body: Mapping[str, Any]) -> DataSource:
    """A DataSource from a form or JSON body; ValidationError names the field."""
    for f in ("endpoint", "region", "access_key", "secret_key"):
        if body.get(f) is not None and not isinstance(body.get(f), str):
            raise ValidationError(f, "must be a string")
    for f in ("bandwidth_mbps", "workers"):
        if isinstance(body.get(f), (bool, list, dict)):
            raise ValidationError(f, "must be a number")
    for f in ("endpoint", "access_key", "secret_key"):
        if not str(body.get(f) or "").strip():
            raise ValidationError(f, "is required")
    buckets = body.get("buckets") or []
    if not isinstance(buckets, (str, list)) or (isinstance(buckets, list)
                                                 and not all(isinstance(b, str) for b in buckets)):
        raise ValidationError("buckets", "a list of bucket names")
    if isinstance(buckets, str):
        buckets = [b.strip() for b in buckets.replace(",", " ").split() if b.strip()]
    try:
        bw = float(body["bandwidth_mbps"]) if body.get("bandwidth_mbps") not in (None, "") else None
        workers = int(body["workers"]) if body.get("workers") not in (None, "") else None
    except (TypeError, ValueError):
        raise ValidationError("bandwidth_mbps/workers", "must be numbers") from None
    try:
        src = DataSource(name=str(name), endpoint=str(body["endpoint"]).strip(),
                         region=str(body.get("region") or "us-east-1").strip(),
                         access_key=str(body["access_key"]).strip(), secret_key=str(body["secret_key"]).strip(),
                         buckets=tuple(str(b) for b in buckets), bandwidth_mbps=bw, workers=workers)
        check_source(src)
    except CredentialsError as e:
        raise ValidationError("datasource", str(e)) from None
    return src


def check_access(src: DataSource) -> None:
    """Each location the source names exists and its keys open it (StorageError says which
    failed and why). A source that names none is checked when a job uses it."""
    storage.check_access(src)


def add_source(db: Session, box: SecretBox, user: User, src: DataSource) -> DataSourceRecord:
    if db.exec(select(DataSourceRecord).where(DataSourceRecord.user_id == user.id,
                                              DataSourceRecord.name == src.name)).first():
        raise ConflictError("you already have a data source named %r; pick another name or delete it" % src.name)
    rec = DataSourceRecord(user_id=user.id, name=src.name, endpoint=src.endpoint, region=src.region,
                           buckets_json=json.dumps(list(src.buckets)), bandwidth_mbps=src.bandwidth_mbps,
                           workers=src.workers, access_key_sealed=box.seal(src.access_key),
                           secret_key_sealed=box.seal(src.secret_key), access_key_hint=mask(src.access_key))
    db.add(rec)
    db.flush()
    return rec


def list_sources(db: Session, user: User) -> list[DataSourceRecord]:
    return list(db.exec(select(DataSourceRecord).where(DataSourceRecord.user_id == user.id)
                        .order_by(DataSourceRecord.name)))


def get_source(db: Session, user: User, name: str) -> DataSourceRecord:
    rec = db.exec(select(DataSourceRecord).where(DataSourceRecord.user_id == user.id,
                                                 DataSourceRecord.name == name)).first()
    if rec is None:
        raise NotFoundError.of("data source %r" % name)
    return rec


def delete_source(db: Session, user: User, name: str) -> None:
    db.delete(get_source(db, user, name))


def open_record(box: SecretBox, rec: DataSourceRecord) -> DataSource:
    return DataSource(name=rec.name, endpoint=rec.endpoint, region=rec.region,
                      access_key=box.open(rec.access_key_sealed, "the access key of data source %r" % rec.name),
                      secret_key=box.open(rec.secret_key_sealed, "the secret key of data source %r" % rec.name),
                      buckets=tuple(json.loads(rec.buckets_json or "[]")), bandwidth_mbps=rec.bandwidth_mbps,
                      workers=rec.workers)


def sources_of(db: Session, box: SecretBox, user: User) -> dict[str, DataSource]:
    """The user's data sources, opened, by name (for validating and submitting a job)."""
    return {rec.name: open_record(box, rec) for rec in list_sources(db, user)}


def register(db: Session, box: SecretBox, user: User, create: DataSourceCreate) -> DataSourceRecord:
    """Register a data source from its create model: values checked, then (``check``) each
    bucket opened with its keys, then stored with the keys sealed. The caller commits."""
    src = parse_source(create.name.strip(), create.model_dump(exclude={"name", "check"}))
    if create.check:
        check_access(src)
    return add_source(db, box, user, src)


def _example(src: DataSource) -> str:
    hints = storage.location_hints(src)
    return hints[0].prefix + "..." if hints else "one of its buckets"


def browse(db: Session, box: SecretBox, user: User, name: str, prefix: str, limit: int = 1000,
           token: str | None = None) -> Listing:
    """One level of ``prefix`` on the user's data source ``name``."""
    src = open_record(box, get_source(db, user, name))
    if not prefix.strip() or not storage.needs_credentials(prefix.strip()):
        raise ValidationError("prefix", "give a location of data source %s, e.g. %s"
                                        % (src.name, storage.default_root(src) or _example(src)))
    return storage.browse_uri(prefix.strip(), StoreContext(sources={src.name: src}), source=src.name,
                              page_size=limit, token=token)

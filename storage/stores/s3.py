"""S3-compatible object storage as a store: ``s3://bucket/prefix``.

The data source comes from the user's sources (the one that lists the bucket, else the only one
that lists none: :func:`storage.credentials.resolve_source`); staging runs the transfer engine
(:mod:`storage.transfer`), browsing :func:`storage.browse.list_prefix`. Importing this module
loads boto3: the registry does it on the first ``s3://`` location.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from storage.browse import list_prefix
from storage.credentials import DataSource, load_credentials, resolve_source
from storage.errors import LocationError
from storage.local import CopyStats, sweep_partials
from storage.s3 import S3Store, translate
from storage.store import Checked, Listing, LocationHint, NamedSource, StageRequest, Store, StoreContext
from storage.transfer import Transfer, TransferOptions
from storage.uris import DataLocation, Scheme, parse_location


def transfer_options(source: DataSource, req: StageRequest) -> TransferOptions:
    """``req.options``, then the data source's settings, then the request's explicit values. A
    bandwidth cap can only be lowered: the tightest of the source's (the site protects its
    storage) and the caller's applies."""
    opt = req.options or TransferOptions()
    workers = req.workers or source.workers or opt.workers
    caps = [c for c in (opt.bandwidth_mbps, source.bandwidth_mbps, req.bandwidth_mbps) if c]
    return replace(opt, workers=workers, bandwidth_mbps=min(caps) if caps else None,
                   progress_every=opt.progress_every if req.progress_every is None else req.progress_every)


class S3DataStore(Store[DataLocation]):
    scheme = "s3"
    form = "s3://bucket/prefix"
    takes_credentials = True

    def parse(self, text: str) -> DataLocation:
        loc = parse_location(text)
        if loc.scheme is not Scheme.S3:
            raise LocationError(text, "not an s3:// location")
        return loc

    def check(self, loc: DataLocation, ctx: StoreContext) -> Checked[DataLocation]:
        return Checked(loc, (resolve_source(ctx.sources, loc),))

    def validate(self, checked: Checked[DataLocation], ctx: StoreContext, must_exist: bool,
                 check_store: bool) -> None:
        """One ``ListObjectsV2`` (``MaxKeys=1``), and a HEAD for a single object: the bucket
        exists, the keys open it and, with ``must_exist``, something is there."""
        if not check_store:
            return
        loc, (source,) = checked.location, checked.sources
        text = loc.original
        with S3Store(source, workers=1, connect_timeout=ctx.timeout_s, read_timeout=ctx.timeout_s) as store:
            try:
                prefixes, objects, _ = store.list_dir(loc.bucket, loc.key + "/" if loc.key else "", max_keys=1)
                if must_exist and not prefixes and not objects and not (loc.key and store.head(loc.bucket, loc.key)):
                    raise LocationError(text, "no objects under this prefix in bucket %r (check the prefix)"
                                        % loc.bucket)
            except LocationError:
                raise
            except Exception as e:  # noqa: BLE001 - worded by translate()
                raise translate(e, text, source) from e

    def _run(self, loc: DataLocation, req: StageRequest, label: str,
             body: Callable[[Transfer], CopyStats]) -> CopyStats:
        source = resolve_source(load_credentials(req.credentials), loc)
        opt = transfer_options(source, req)
        with S3Store(source, workers=opt.workers) as store:
            return body(Transfer(store, opt, label, req.emit))

    def stage_in(self, loc: DataLocation, dest_dir: Path, missing_ok: bool, req: StageRequest) -> CopyStats:
        if dest_dir.is_dir():
            sweep_partials(dest_dir)
        return self._run(loc, req, "stage in %s" % loc.uri,
                         lambda t: t.download(loc, dest_dir, missing_ok=missing_ok))

    def stage_out(self, src: Path, loc: DataLocation, req: StageRequest) -> CopyStats:
        return self._run(loc, req, "stage out %s" % loc.uri, lambda t: t.upload(src, loc))

    def browse(self, loc: DataLocation, ctx: StoreContext, source: str | None, page_size: int,
               token: str | None) -> Listing:
        if source is None:
            src = self.check(loc, ctx).sources[0]
        elif source in ctx.sources:
            src = ctx.sources[source]
        else:
            raise LocationError(loc.original, "no data source named %r (yours: %s); register it on the Data page"
                                              % (source, ", ".join(sorted(ctx.sources)) or "none"))
        return list_prefix(src, loc, page_size=page_size, token=token)

    def parent(self, loc: DataLocation) -> str | None:
        if not loc.key:
            return None
        return "s3://%s" % loc.path.rsplit("/", 1)[0]

    def roots(self, source: NamedSource) -> tuple[str, ...]:
        return tuple("s3://%s" % b for b in source.buckets)

    def hints(self, source: NamedSource) -> tuple[LocationHint, ...]:
        if not source.buckets:
            return (LocationHint("s3://", "any bucket (data source %s)" % source.name),)
        return tuple(LocationHint("s3://%s/" % b, "bucket %s (data source %s)" % (b, source.name))
                     for b in source.buckets)

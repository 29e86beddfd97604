"""A job's data locations and data-source credentials, on the portal's side.

Before submitting: every input and the output are validated (syntax, the user's data roots,
symlinks, bucket and keys) so a bad location is refused with a clear message instead of a job
failing later. After preparing the job folder: the sources the job needs are written into its
credentials file, and the spec passes that file's path (never the keys) to `aiportal stage`.
When the job is over for good: :func:`finish_job_data` removes the file and reports a
stage-out still pending.

Where sources come from (a user's registered data sources, sealed in the database with the
site's data key: :func:`storage.credentials.seal_source` / ``open_source``) is the caller's.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from portal.settings import Settings
from slurm.spec import JobSpec
from storage import StoreContext, check_locations
from storage.credentials import JOB_CREDENTIALS_NAME, DataSource, remove_job_credentials, write_job_credentials
from storage.stage import pending_stage_outs


def data_roots(settings: Settings, user: str) -> tuple[str, ...]:
    """Shared-filesystem directories a user's jobs may read and write: their own folder and
    the site's shared datasets."""
    root = settings.shared_root.rstrip("/")
    return ("%s/users/%s" % (root, user), "%s/datasets" % root)


def check_job_data(settings: Settings, user: str, inputs: Sequence[str], output: str | None,
                   sources: Mapping[str, DataSource] | None = None, roots: Sequence[str] | None = None,
                   check_store: bool = True) -> dict[str, DataSource]:
    """Validate a job's locations (inputs must exist; the output need not); returns the data
    sources the job needs, by name. Raises :class:`storage.errors.StorageError` subclasses."""
    roots = tuple(roots) if roots is not None else data_roots(settings, user)
    return check_locations(inputs, output, StoreContext(roots, sources or {}), check_store=check_store)


def attach_credentials(spec: JobSpec, user: str, sources: Mapping[str, DataSource]) -> JobSpec:
    """Write the job's credentials file (the job folder must exist) and return the spec that
    passes it to the stage commands; the spec unchanged when the job needs no data source."""
    if not sources:
        return spec
    write_job_credentials(spec.job_dir, sources.values(), user=user, name=JOB_CREDENTIALS_NAME)
    return replace(spec, credentials_file=JOB_CREDENTIALS_NAME)


def finish_job_data(job_dir: str | Path) -> list[dict[str, Any]]:
    """For a job that is over for good (completed, failed, cancelled; not requeued): remove
    its credentials file, unless a stage-out is still pending (finishing it needs the file).
    Returns the pending stage-out records, for the job's record."""
    pending = pending_stage_outs(job_dir)
    if not pending:
        remove_job_credentials(job_dir)
    return pending

"""`aiportal stage in|out`: run inside a job on the compute node, as the job's user."""
from __future__ import annotations

import logging

from storage.errors import StagingError
from storage.local import CopyStats, copy_tree
from storage.uris import Scheme, parse_location

log = logging.getLogger(__name__)


def stage_in(source: str, dest_dir: str, missing_ok: bool = False) -> CopyStats:
    loc = parse_location(source)
    if loc.scheme is Scheme.S3:
        raise StagingError(source, "staging from S3 is not available in this version of aiportal; "
                                   "use a shared-filesystem path")
    return copy_tree(loc.path, dest_dir, missing_ok=missing_ok)


def stage_out(source_dir: str, dest: str) -> CopyStats:
    loc = parse_location(dest)
    if loc.scheme is Scheme.S3:
        raise StagingError(dest, "staging to S3 is not available in this version of aiportal; "
                                 "use a shared-filesystem path")
    return copy_tree(source_dir, loc.path)

"""Image cache benchmark: cold conversion of a docker-archive vs a cache hit, in the same run.

    .venv/bin/python bench/bench_image_cache.py [--sif BASE.sif] [--hits 200]

Makes a docker-archive of the base image offline (apptainer sandbox -> umoci -> skopeo), then
with a fresh cache root (empty apptainer layer cache too):
1. cold: SifCache.ensure() of the archive (hash + apptainer build with zstd);
2. hit: SifCache.lookup() and ensure() of the same reference, many times (index + stat).
   Target: hit under 50 ms.
Also prints what hashing alone costs (a lookup without the sidecar index), the work the index
saves on every hit. Run as root (umoci keeps file owners).
"""
from __future__ import annotations

import argparse
import glob
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from containers.builder import archives_from_sif  # noqa: E402
from containers.cache import SifCache  # noqa: E402
from containers.digests import file_sha256  # noqa: E402
from containers.refs import parse_image_ref  # noqa: E402

BASE_GLOB = "/srv/aiportal/shared/images/base/debian-python-*.sif"


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sif", help="base SIF (default: newest %s)" % BASE_GLOB)
    ap.add_argument("--hits", type=int, default=200)
    args = ap.parse_args()
    sif = Path(args.sif) if args.sif else max(map(Path, glob.glob(BASE_GLOB)),
                                              key=lambda p: p.stat().st_mtime, default=None)
    if sif is None or not sif.is_file():
        print("no base SIF: build it first (make test builds %s)" % BASE_GLOB, file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-image-cache-", dir="/var/tmp"))
    try:
        t0 = time.perf_counter()
        image = archives_from_sif(sif, work / "image", name="bench/py")
        t_archive = time.perf_counter() - t0
        size_mb = image.docker_archive.stat().st_size / 1e6
        ref = parse_image_ref("docker-archive:%s" % image.docker_archive)
        print("base %s; docker-archive %.0f MB made in %.1f s" % (sif.name, size_mb, t_archive))

        hash_only = timed(lambda: file_sha256(image.docker_archive), 3)
        cache = SifCache(work / "cache")
        t0 = time.perf_counter()
        out = cache.ensure(ref)
        cold = time.perf_counter() - t0
        lookups = timed(lambda: cache.lookup(ref), args.hits)
        ensures = timed(lambda: cache.ensure(ref), args.hits)
        p50, p95 = statistics.median(lookups), sorted(lookups)[int(0.95 * len(lookups)) - 1]
        print("cold ensure (hash + apptainer build, zstd): %.2f s -> %s (%.0f MB)"
              % (cold, out.name[:16] + "...", out.stat().st_size / 1e6))
        print("hashing alone (what the index saves per hit): median %.0f ms of 3"
              % (statistics.median(hash_only) * 1e3))
        print("hit, lookup(): p50 %.3f ms, p95 %.3f ms over %d; ensure(): p50 %.3f ms"
              % (p50 * 1e3, p95 * 1e3, len(lookups), statistics.median(ensures) * 1e3))
        print("ratio cold/hit %.0fx; hit target < 50 ms: %s"
              % (cold / p50, "met" if p50 < 0.05 else "MISSED"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

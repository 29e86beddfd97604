"""Runs SifCache.ensure in its own process, for the concurrency tests.

    python -m tests.containers.ensure_worker ROOT REF RECORD GO MODE

Waits until the file GO exists (so that all workers start together), then ensures REF in the
cache at ROOT with a builder that appends its pid to RECORD and then either sleeps and writes
a small fake image (MODE ``fake``) or runs the real apptainer builder (MODE ``real``). Prints
the SIF path.
"""
import os
import sys
import time
from pathlib import Path

from containers.cache import SifCache
from containers.refs import parse_image_ref


def main() -> None:
    root, ref, record, go, mode = sys.argv[1:6]
    cache = SifCache(Path(root))
    real = cache.builder

    def builder(image_ref, dest: Path) -> None:
        with open(record, "a") as f:
            f.write("%d\n" % os.getpid())
        if mode == "real":
            real(image_ref, dest)
        else:
            time.sleep(1.0)
            dest.write_bytes(b"fake sif\n" * 1000)

    deadline = time.monotonic() + 30
    while not Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    print(cache.ensure(parse_image_ref(ref), builder=builder))


if __name__ == "__main__":
    main()

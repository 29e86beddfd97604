"""Staging throughput: the transfer engine against plain boto3 and `cp`, in the same run.

    .venv/bin/python bench/bench_staging.py [--small 2000] [--small-kb 48] [--large 4] [--large-mb 224]
                                            [--workers 8] [--repeat 2] [--dir /var/tmp]

Makes a dataset of many small files and a few large ones (~1 GB by default) on the local disk,
then, for the small files, the large files (best of ``--repeat``, default 2: the VM is noisy) and
the whole set (once), measures with a fresh prefix or folder each time:

* ``cp -r`` + ``sync`` on the same disk (the ceiling);

Every download is timed up to a ``sync``, like the ``cp``: the engine fsyncs each file before
renaming it into place, boto3 does not, and unsynced data would be written back during the
next measurement.
* stage-out and stage-in with the engine (``storage.stage``, ``--workers`` requests at a time);
* a plain single-threaded boto3 copy (``upload_file``/``download_file`` file by file,
  ``use_threads=False``): the baseline of the issue's "2x on many small files" target;
* boto3's own TransferManager with its default 10 threads, file by file: what the S3 server
  can take from one well-tuned client, the reference of the "80% on large files" target.

Needs the dev SeaweedFS (keys from /etc/aiportal/s3-admin.json, so run as root). Everything it
writes (a bucket, the dataset) is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import boto3  # noqa: E402
from boto3.s3.transfer import TransferConfig  # noqa: E402
from botocore.config import Config  # noqa: E402

from storage.credentials import parse_credentials  # noqa: E402
from storage.stage import stage_in, stage_out  # noqa: E402
from storage.transfer import TransferOptions  # noqa: E402

MiB = 1 << 20


def make_dataset(root: Path, small: int, small_kb: int, large: int, large_mb: int) -> None:
    for i in range(small):
        d = root / "small" / ("shard-%02d" % (i % 20))
        d.mkdir(parents=True, exist_ok=True)
        # sizes around small_kb (half to 1.5x), like image files
        size = small_kb * 1024 // 2 + (i * 7919) % (small_kb * 1024)
        (d / ("img-%05d.bin" % i)).write_bytes(os.urandom(size))
    (root / "large").mkdir(parents=True)
    for i in range(large):
        with open(root / "large" / ("shard-%d.tar" % i), "wb") as f:
            for _ in range(large_mb // 8):
                f.write(os.urandom(8 * MiB))


def tree_bytes(root: Path) -> tuple[int, int]:
    files = total = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            files += 1
            total += os.path.getsize(os.path.join(dirpath, n))
    return files, total


def files_of(root: Path) -> list[tuple[Path, str]]:
    out = []
    for dirpath, _, names in os.walk(root):
        for n in sorted(names):
            p = Path(dirpath) / n
            out.append((p, p.relative_to(root).as_posix()))
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--small-kb", type=int, default=48)
    ap.add_argument("--large", type=int, default=4)
    ap.add_argument("--large-mb", type=int, default=224)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--repeat", type=int, default=2, help="best of N for the small and large subsets")
    args = ap.parse_args()

    creds = json.loads(Path("/etc/aiportal/s3-admin.json").read_text())
    sources = parse_credentials(creds)
    client = boto3.session.Session().client(
        "s3", endpoint_url=creds["endpoint"], region_name=creds["region"], aws_access_key_id=creds["access_key"],
        aws_secret_access_key=creds["secret_key"],
        config=Config(signature_version="s3v4", max_pool_connections=16, s3={"addressing_style": "path"}))
    single = TransferConfig(use_threads=False)
    threaded = TransferConfig()             # boto3's defaults: 10 threads, 8 MiB parts
    bucket = "bench-%s" % uuid.uuid4().hex[:10]
    client.create_bucket(Bucket=bucket)
    work = Path(tempfile.mkdtemp(prefix="bench-staging-", dir=args.dir))
    opt = TransferOptions(workers=args.workers, progress_every=3600)
    rows: list[tuple[str, str, int, float]] = []
    try:
        t = time.perf_counter()
        make_dataset(work / "data", args.small, args.small_kb, args.large, args.large_mb)
        nfiles, nbytes = tree_bytes(work / "data")
        print("dataset: %d files, %.0f MB (%d x ~%d KB + %d x %d MB), made in %.1f s; %d CPUs, workers=%d"
              % (nfiles, nbytes / 1e6, args.small, args.small_kb, args.large, args.large_mb,
                 time.perf_counter() - t, os.cpu_count(), args.workers), flush=True)
        subprocess.run(["sync"], check=True)

        def delete_prefix(prefix: str) -> None:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
                if keys:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})

        for subset, reps in (("small", args.repeat), ("large", args.repeat), ("", 1)):
            src = work / "data" / subset if subset else work / "data"
            name = subset or "all"
            _, size = tree_bytes(src)
            pairs = files_of(src)
            best: dict[str, float] = {}

            def keep(what: str, seconds: float) -> None:
                best[what] = min(seconds, best.get(what, seconds))

            def sync() -> None:
                subprocess.run(["sync"], check=True)

            for rep in range(reps):
                tag = uuid.uuid4().hex[:6]

                def cp():
                    subprocess.run(["cp", "-r", str(src), str(work / "cp")], check=True)
                    sync()
                keep("cp -r + sync (ceiling)", timed(cp))
                shutil.rmtree(work / "cp")

                prefix = "ours-%s-%s" % (name, tag)
                uri = "s3://%s/%s" % (bucket, prefix)
                keep("stage out (engine)", timed(lambda: stage_out(str(src), uri, credentials=sources, options=opt)))
                for f in work.glob("data/STAGE_OUT_PENDING*"):
                    f.unlink()
                keep("stage in (engine)", timed(lambda: (stage_in(uri, str(work / "in"), credentials=sources,
                                                                  options=opt), sync())))
                shutil.rmtree(work / "in")
                delete_prefix(prefix)

                for label, config in (("boto3 1 thread", single), ("boto3 TransferManager", threaded)):
                    prefix = "%s-%s-%s" % ("single" if config is single else "tm", name, tag)

                    def up():
                        for p, rel in pairs:
                            client.upload_file(str(p), bucket, "%s/%s" % (prefix, rel), Config=config)

                    def down():
                        for p, rel in pairs:
                            out = work / "in" / rel
                            out.parent.mkdir(parents=True, exist_ok=True)
                            client.download_file(bucket, "%s/%s" % (prefix, rel), str(out), Config=config)
                        sync()
                    keep("upload " + label, timed(up))
                    keep("download " + label, timed(down))
                    shutil.rmtree(work / "in")
                    delete_prefix(prefix)
            for what in ("cp -r + sync (ceiling)", "stage out (engine)", "upload boto3 1 thread",
                         "upload boto3 TransferManager", "stage in (engine)", "download boto3 1 thread",
                         "download boto3 TransferManager"):
                rows.append((name, what, size, best[what]))
                print("  %-6s %-32s %8.0f MB %7.2f s %8.1f MB/s%s" % (name, what, size / 1e6, best[what],
                                                                     size / 1e6 / best[what],
                                                                     " (best of %d)" % reps if reps > 1 else ""),
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        client.delete_bucket(Bucket=bucket)
        client.close()

    rate = {(n, w): s / 1e6 / t for n, w, s, t in rows}
    print("\nratios (throughput / throughput):")
    for n in ("small", "large", "all"):
        for d, eng, one, tm in (("out", "stage out (engine)", "upload boto3 1 thread", "upload boto3 TransferManager"),
                                ("in", "stage in (engine)", "download boto3 1 thread", "download boto3 TransferManager")):
            e = rate[(n, eng)]
            print("  %-5s %-3s engine %7.1f MB/s = %5.2fx boto3 1 thread, %4.0f%% of boto3 TransferManager, "
                  "%4.0f%% of cp" % (n, d, e, e / rate[(n, one)], 100 * e / rate[(n, tm)],
                                     100 * e / rate[(n, "cp -r + sync (ceiling)")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

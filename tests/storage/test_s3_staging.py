"""S3 staging against the dev SeaweedFS (127.0.0.1:9000): round trips between S3, the shared
filesystem and scratch; skips, resume after a killed transfer, integrity, bandwidth, refusals
with clear messages, and the portal's helpers (browse, size, presigned links, server-side copy)."""
import hashlib
import json
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import replace
from pathlib import Path

import pytest

from storage.browse import copy_prefix, dataset_size, list_prefix, presigned_url
from storage.credentials import write_job_credentials
from storage.errors import AccessDeniedError, IntegrityError, LocationError, StageOutPendingError
from storage.integrity import composite_crc32, etag_of_file, parse_etag
from storage.s3 import S3Store
from storage.stage import pending_record_path, stage_in, stage_out
from storage.transfer import TransferOptions
from storage.validate import validate_location
from tests.conftest import REPO
from tests.storage.s3_helpers import admin_source, drop_bucket, make_bucket, strip_xattrs, tree_digest

pytestmark = pytest.mark.s3
MiB = 1 << 20
AIPORTAL = str(REPO / ".venv" / "bin" / "aiportal")
FAST = TransferOptions(progress_every=0.5)


@pytest.fixture(scope="module")
def source():
    return admin_source(json.loads(Path("/etc/aiportal/s3-admin.json").read_text()))


@pytest.fixture
def bucket(source):
    name = make_bucket(source)
    yield name
    drop_bucket(source, name)


@pytest.fixture
def creds_file(source, tmp_path):
    d = tmp_path / "creds"
    d.mkdir()
    return write_job_credentials(d, [source])


def make_tree(root: Path, big: int = 200 * MiB) -> Path:
    (root / "nested" / "deeper" / "deepest").mkdir(parents=True)
    (root / "empty dir" / "inner").mkdir(parents=True)
    (root / "empty.txt").write_bytes(b"")
    (root / "nested" / "empty-too").write_bytes(b"")
    (root / "ünï cödé ✓ 日本語.txt").write_text("unicode names\n")
    (root / "nested" / "données").write_bytes(os.urandom(3000))
    (root / "nested" / "deeper" / "deepest" / "mid.bin").write_bytes(os.urandom(20 * MiB + 123))
    for i in range(30):
        (root / "nested" / "deeper" / ("small-%02d.txt" % i)).write_text("line %d\n" % i * (i + 1))
    with open(root / "big.bin", "wb") as f:
        for _ in range(big // (8 * MiB)):
            f.write(os.urandom(8 * MiB))
        f.write(os.urandom(big % (8 * MiB)))
    return root


def test_round_trip_shared_s3_scratch_and_skips(source, bucket, job_dir, tmp_path, caplog):
    shared = make_tree(job_dir / "src")
    want = tree_digest(shared)
    files = sum(1 for v in want.values() if v != "dir")
    ds, back = "s3://%s/datasets/ds ✓" % bucket, "s3://%s/back" % bucket
    creds = {source.name: source}
    caplog.set_level(logging.INFO, logger="storage")

    up = stage_out(str(shared), ds, credentials=creds, options=FAST)
    assert (up.files, up.copied, up.skipped) == (files, files, 0)
    assert not pending_record_path(shared).exists()
    # the 200 MB file went up in parts; its ETag is the AWS multipart ETag of the local file
    with S3Store(source) as s:
        head = s.head(bucket, "datasets/ds ✓/big.bin")
        assert parse_etag(head.etag) == etag_of_file(shared / "big.bin", 8 * MiB) and parse_etag(head.etag).parts == 25
        data = (shared / "big.bin").read_bytes()
        crcs = [zlib.crc32(data[off:off + 8 * MiB]) for off in range(0, len(data), 8 * MiB)]
        assert s.checksum_crc32(bucket, "datasets/ds ✓/big.bin") == composite_crc32(crcs)     # what downloads check
        del data
        assert s.head(bucket, "datasets/ds ✓/empty dir/inner/") is not None      # empty directories kept

    scratch = tmp_path / "scratch"
    down = stage_in(ds, str(scratch), credentials=creds, options=FAST)
    assert (down.copied, down.skipped) == (files, 0)
    assert tree_digest(scratch) == want
    assert stage_out(str(scratch), back, credentials=creds, options=FAST).copied == files
    shared_back = job_dir / "back"
    stage_in(back, str(shared_back), credentials=creds, options=FAST)
    assert tree_digest(shared_back) == want
    assert any("stage out s3://%s/datasets/ds ✓: " % bucket in r.message and "files" in r.message
               and "ETA" in r.message for r in caplog.records), "no progress lines"

    # second runs: nothing moves (ETags cached in xattrs)
    again = stage_out(str(shared), ds, credentials=creds, options=FAST)
    assert (again.copied, again.skipped, again.bytes_copied) == (0, files, 0)
    assert stage_in(ds, str(scratch), credentials=creds, options=FAST).skipped == files
    # without the cache: files are hashed the way the store hashed them, still nothing moves
    strip_xattrs(scratch)
    strip_xattrs(shared)
    assert stage_in(ds, str(scratch), credentials=creds, options=FAST).skipped == files
    assert stage_out(str(shared), ds, credentials=creds, options=FAST).skipped == files
    # a changed file (same size) is the only one sent again, both ways
    target = shared / "nested" / "deeper" / "small-03.txt"
    target.write_text(target.read_text().upper())
    changed = stage_out(str(shared), ds, credentials=creds, options=FAST)
    assert (changed.copied, changed.skipped) == (1, files - 1)
    changed_in = stage_in(ds, str(scratch), credentials=creds, options=FAST)
    assert (changed_in.copied, changed_in.bytes_copied) == (1, target.stat().st_size)
    assert (scratch / "nested" / "deeper" / "small-03.txt").read_text() == target.read_text()


def test_single_object_and_missing_ok(source, bucket, tmp_path):
    creds = {source.name: source}
    (tmp_path / "one.txt").write_text("one")
    stage_out(str(tmp_path / "one.txt"), "s3://%s/single" % bucket, credentials=creds)
    stage_in("s3://%s/single/one.txt" % bucket, str(tmp_path / "got"), credentials=creds)
    assert (tmp_path / "got" / "one.txt").read_text() == "one"
    # a local file written after the object was stored (a checkpoint whose stage-out failed) is kept
    time.sleep(0.01)
    later = tmp_path / "got" / "one.txt"
    later.write_text("newer checkpoint")
    os.utime(later, (time.time() + 5, time.time() + 5))
    kept = stage_in("s3://%s/single/one.txt" % bucket, str(tmp_path / "got"), credentials=creds)
    assert (kept.copied, kept.kept_newer) == (0, 1) and later.read_text() == "newer checkpoint"
    assert "1 kept because the local copy is newer" in kept.summary()
    os.utime(later, (time.time() - 3600, time.time() - 3600))        # older than the object: restored
    assert stage_in("s3://%s/single/one.txt" % bucket, str(tmp_path / "got"), credentials=creds).copied == 1
    assert later.read_text() == "one"
    assert stage_in("s3://%s/never-written" % bucket, str(tmp_path / "out"), missing_ok=True, credentials=creds).files == 0
    assert (tmp_path / "out").is_dir()
    with pytest.raises(LocationError, match="no objects under this prefix"):
        stage_in("s3://%s/never-written" % bucket, str(tmp_path / "out"), credentials=creds)


def _run_killed(argv, until, timeout=60.0):
    """Run argv, SIGKILL it as soon as until() is true; returns its output so far."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not until():
            assert proc.poll() is None, "finished before it could be killed:\n%s" % proc.stdout.read().decode()
            assert time.monotonic() < deadline, "condition never met"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        return proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_killed_transfers_resume_without_resending_complete_files(source, bucket, creds_file, tmp_path, caplog):
    src = tmp_path / "out"
    src.mkdir()
    for i in range(4):
        (src / ("small-%d.bin" % i)).write_bytes(os.urandom(12 * MiB))
    (src / "large.bin").write_bytes(os.urandom(64 * MiB))
    uri = "s3://%s/ckpt" % bucket
    slow = ["--credentials", str(creds_file), "--workers", "1", "--bandwidth-mbps", "400", "--progress-every", "0.2"]
    store = S3Store(source)
    try:
        def parts_up():
            ups = store.uploads(bucket, "ckpt/large.bin")
            return bool(ups) and len(store.parts(bucket, "ckpt/large.bin", ups[0][0])) >= 2
        out = _run_killed([AIPORTAL, "stage", "out", "--from", str(src), "--to", uri] + slow, parts_up)
        assert "stage out %s:" % uri in out
        record = json.loads(pending_record_path(src).read_text())
        assert record["state"] == "in_progress" and record["destination"] == uri     # killed: the record says so
        assert store.head(bucket, "ckpt/large.bin") is None

        caplog.set_level(logging.INFO, logger="storage")
        stats = stage_out(str(src), uri, credentials=creds_file)
        assert (stats.copied, stats.skipped) == (1, 4), stats.summary()
        resumed = [r.message for r in caplog.records if "resuming an unfinished upload" in r.message]
        assert resumed and "of 8 parts already there" in resumed[0]
        assert parse_etag(store.head(bucket, "ckpt/large.bin").etag) == etag_of_file(src / "large.bin", 8 * MiB)
        assert store.uploads(bucket, "ckpt/large.bin") == []
        assert not pending_record_path(src).exists()

        dst = tmp_path / "restore"

        def some_files_landed():
            return dst.is_dir() and len([n for n in os.listdir(dst) if not n.startswith(".")]) >= 2
        _run_killed([AIPORTAL, "stage", "in", "--from", uri, "--to", str(dst)] + slow, some_files_landed)
        visible = [n for n in os.listdir(dst) if not n.startswith(".")]
        for name in visible:           # whatever is under its real name is complete
            assert (dst / name).read_bytes() == (src / name).read_bytes()
        assert len(visible) < 5
        again = stage_in(uri, str(dst), credentials=creds_file)
        assert again.skipped == len(visible) and again.copied == 5 - len(visible)
        assert tree_digest(dst) == tree_digest(src)
        assert [n for n in os.listdir(dst) if "aiportal-partial" in n] == []     # the dead writer's temp is gone
    finally:
        store.close()


def test_corrupted_downloads_are_retried_then_fail_loudly(source, bucket, tmp_path, monkeypatch):
    creds = {source.name: source}
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f.bin").write_bytes(os.urandom(3 * MiB))
    (tmp_path / "src" / "g.bin").write_bytes(os.urandom(20 * MiB))
    stage_out(str(tmp_path / "src"), "s3://%s/c" % bucket, credentials=creds)
    real_get = S3Store.get
    corrupt = {"c/f.bin": 1, "c/g.bin": 1}       # f: verified by MD5 (ETag), g: by COMPOSITE CRC32

    def flaky_get(self, bucket_, key, sink, *a, **kw):
        def bad_sink(b):
            if corrupt.get(key, 0) > 0:
                corrupt[key] -= 1
                b = bytes([b[0] ^ 0xFF]) + b[1:]
            sink(b)
        return real_get(self, bucket_, key, bad_sink, *a, **kw)
    monkeypatch.setattr(S3Store, "get", flaky_get)
    stats = stage_in("s3://%s/c" % bucket, str(tmp_path / "ok"), credentials=creds)
    assert stats.copied == 2 and tree_digest(tmp_path / "ok") == tree_digest(tmp_path / "src")
    assert corrupt == {"c/f.bin": 0, "c/g.bin": 0}
    for key, how in (("c/f.bin", r"checksum [0-9a-f]{32}, expected ETag"), ("c/g.bin", r"checksum CRC32 \S+-3, expected CRC32")):
        corrupt[key] = 10 ** 6
        with pytest.raises(IntegrityError, match=r"%s: downloaded 3 times, never intact \(%s" % (key, how)):
            stage_in("s3://%s/c" % bucket, str(tmp_path / key), credentials=creds)
        corrupt[key] = 0
        assert not (tmp_path / key / key[2:]).exists()
        assert [n for n in os.listdir(tmp_path / key) if "partial" in n] == []


def test_bandwidth_cap_holds(source, bucket, tmp_path):
    creds = {source.name: source}
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f.bin").write_bytes(os.urandom(12 * MiB))
    t0 = time.monotonic()
    stage_out(str(tmp_path / "src"), "s3://%s/bw" % bucket, credentials=creds, bandwidth_mbps=96)   # 12 MB/s
    assert time.monotonic() - t0 > 0.7       # 12.6 MB at 12 MB/s, less a 3 MB burst
    t0 = time.monotonic()
    capped = replace(source, bandwidth_mbps=96)
    stage_in("s3://%s/bw" % bucket, str(tmp_path / "in"), credentials={"lab": capped})   # the source's own cap
    assert time.monotonic() - t0 > 0.7


def test_wrong_keys_are_refused_clearly_and_never_printed(source, bucket, tmp_path):
    wrong_secret = replace(source, secret_key="Wrong-Secret-" + "q" * 27)
    wrong_access = replace(source, access_key="NOSUCHACCESSKEY00001")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")
    for bad, code in ((wrong_secret, "SignatureDoesNotMatch"), (wrong_access, "InvalidAccessKeyId")):
        with pytest.raises(AccessDeniedError, match=r"refused the keys \(%s\); check the data source's access key and "
                                                    r"secret key" % code) as err:
            stage_in("s3://%s/x" % bucket, str(tmp_path / "d"), credentials={"lab": bad})
        assert bad.secret_key not in str(err.value) and source.secret_key not in str(err.value)
        with pytest.raises(AccessDeniedError):
            validate_location("s3://%s/x" % bucket, sources={"lab": bad})
    with pytest.raises(StageOutPendingError, match="refused the keys") as err:
        stage_out(str(tmp_path / "src"), "s3://%s/x" % bucket, credentials={"lab": wrong_secret})
    assert "The outputs are safe in %s" % (tmp_path / "src") in str(err.value)
    assert wrong_secret.secret_key not in Path(err.value.record).read_text()
    # through the command line: exit 2, a clear line, no key anywhere in the output
    d = tmp_path / "job"
    d.mkdir()
    cf = write_job_credentials(d, [wrong_secret])
    res = subprocess.run([AIPORTAL, "stage", "in", "--from", "s3://%s/x" % bucket, "--to", str(tmp_path / "d"),
                          "--credentials", str(cf)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "refused the keys (SignatureDoesNotMatch)" in res.stderr
    assert wrong_secret.secret_key not in res.stderr + res.stdout and source.access_key not in res.stderr + res.stdout


def test_missing_bucket_is_refused_clearly(source, tmp_path):
    creds = {source.name: source}
    missing = "s3://no-such-bucket-%d/p" % os.getpid()
    msg = r"bucket 'no-such-bucket-\d+' does not exist on %s \(data source 'lab'\); create it or correct the URI" \
        % source.endpoint
    with pytest.raises(LocationError, match=msg):
        validate_location(missing, sources=creds)
    with pytest.raises(LocationError, match=msg):
        stage_in(missing, str(tmp_path / "d"), credentials=creds)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f").write_text("x")
    with pytest.raises(StageOutPendingError, match=msg) as err:
        stage_out(str(tmp_path / "out"), missing, credentials=creds)
    record = json.loads(Path(err.value.record).read_text())
    assert record["state"] == "failed" and record["code"] == "bad_location" and record["destination"] == missing
    assert (tmp_path / "out" / "f").read_text() == "x"


def test_validate_location_against_the_store(source, bucket):
    creds = {source.name: source}
    assert validate_location("s3://%s/new-output" % bucket, sources=creds).key == "new-output"
    with pytest.raises(LocationError, match="no objects under this prefix"):
        validate_location("s3://%s/nothing" % bucket, sources=creds, must_exist=True)
    with S3Store(source) as s:
        s.put(bucket, "data/x", b"1", hashlib.md5(b"1").digest())
    assert validate_location("s3://%s/data" % bucket, sources=creds, must_exist=True)
    assert validate_location("s3://%s/data/x" % bucket, sources=creds, must_exist=True)


def test_browse_size_presigned_links_and_server_side_copy(source, bucket, tmp_path):
    creds = {source.name: source}
    src = tmp_path / "out"
    (src / "checkpoints").mkdir(parents=True)
    (src / "result.txt").write_text("accuracy 0.91\n")
    (src / "checkpoints" / "model.ckpt").write_bytes(os.urandom(100_000))
    stage_out(str(src), "s3://%s/jobs/j1" % bucket, credentials=creds)

    listing = list_prefix(source, "s3://%s/jobs/j1" % bucket)
    assert [(e.name, e.is_dir, e.size) for e in listing.entries] == [("checkpoints", True, 0), ("result.txt", False, 14)]
    assert listing.entries[0].uri == "s3://%s/jobs/j1/checkpoints" % bucket and listing.next_token is None
    size = dataset_size(source, "s3://%s/jobs/j1" % bucket)
    assert (size.files, size.bytes) == (2, 100_014)

    url = presigned_url(source, "s3://%s/jobs/j1/result.txt" % bucket, expires_s=300)
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url and source.secret_key not in url
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.read() == b"accuracy 0.91\n"
        assert 'filename="result.txt"' in r.headers.get("Content-Disposition", "")
    tampered = url.replace("result.txt", "checkpoints/model.ckpt")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(tampered, timeout=10)
    assert err.value.code == 403
    err.value.close()
    with pytest.raises(LocationError, match="no such object"):
        presigned_url(source, "s3://%s/jobs/j1" % bucket)

    copied = copy_prefix(source, "s3://%s/jobs/j1" % bucket, "s3://%s/published/j1" % bucket)
    assert (copied.files, copied.bytes) == (2, 100_014)
    stage_in("s3://%s/published/j1" % bucket, str(tmp_path / "copy"), credentials=creds)
    assert tree_digest(tmp_path / "copy") == tree_digest(src)
    with pytest.raises(LocationError, match="inside the source"):
        copy_prefix(source, "s3://%s/jobs" % bucket, "s3://%s/jobs/j1/again" % bucket)


def test_cli_progress_summary_and_credentials_file_checks(source, bucket, creds_file, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_text("x")
    (src / "big.bin").write_bytes(os.urandom(30 * MiB))
    uri = "s3://%s/cli" % bucket
    res = subprocess.run([AIPORTAL, "stage", "out", "--from", str(src), "--to", uri, "--credentials", str(creds_file),
                          "--progress-every", "0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "[aiportal stage] stage out %s: " % uri in res.stderr and "ETA" in res.stderr
    assert "2 files: 2 copied" in res.stderr
    res = subprocess.run([AIPORTAL, "stage", "in", "--from", uri, "--to", str(tmp_path / "dst"),
                          "--credentials", str(creds_file)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "2 files: 2 copied" in res.stderr
    assert source.secret_key not in res.stderr
    creds_file.chmod(0o644)
    res = subprocess.run([AIPORTAL, "stage", "in", "--from", uri, "--to", str(tmp_path / "dst"),
                          "--credentials", str(creds_file)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "can be read by others (mode 0644); run `chmod 600" in res.stderr
    res = subprocess.run([AIPORTAL, "stage", "in", "--from", uri, "--to", str(tmp_path / "dst")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "no data source credentials for this job" in res.stderr

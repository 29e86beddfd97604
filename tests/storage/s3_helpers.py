"""Helpers for the S3 staging tests: buckets that clean up after themselves, tree comparison,
and a private SeaweedFS that a test may kill."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from storage.credentials import DataSource
from storage.s3 import S3Store

WEED = "/opt/aiportal/seaweedfs/bin/weed"


def admin_source(creds: dict, name: str = "lab", **kw) -> DataSource:
    return DataSource(name=name, endpoint=creds["endpoint"], region=creds["region"],
                      access_key=creds["access_key"], secret_key=creds["secret_key"], **kw)


def make_bucket(source: DataSource, prefix: str = "test") -> str:
    name = "%s-%s" % (prefix, uuid.uuid4().hex[:12])
    with S3Store(source) as s:
        s.client.create_bucket(Bucket=name)
    return name


def drop_bucket(source: DataSource, bucket: str) -> None:
    with S3Store(source) as s:
        for uid_key in _uploads(s, bucket):
            s.abort_upload(bucket, uid_key[1], uid_key[0])
        keys = [o.key for o in s.list(bucket, "")]
        for i in range(0, len(keys), 1000):
            s.client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]],
                                                           "Quiet": True})
        s.client.delete_bucket(Bucket=bucket)


def _uploads(s: S3Store, bucket: str) -> list[tuple[str, str]]:
    page = s.client.list_multipart_uploads(Bucket=bucket)
    return [(u["UploadId"], u["Key"]) for u in page.get("Uploads", ())]


def tree_digest(root: Path) -> dict[str, str]:
    """rel path -> sha256 for files, 'dir' for directories (what a round trip must keep)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in files:
            p = os.path.join(dirpath, f)
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for b in iter(lambda: fh.read(1 << 22), b""):
                    h.update(b)
            out[os.path.relpath(p, root)] = h.hexdigest()
    return out


def strip_xattrs(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                os.removexattr(os.path.join(dirpath, f), "user.aiportal.etag")
            except OSError:
                pass


class PrivateSeaweed:
    """A SeaweedFS of its own on 127.0.0.1:9100-9107 with a fresh data dir; killed by pid."""

    PORTS = {"s3": 9100, "master": 9101, "master_grpc": 9102, "volume": 9103, "volume_grpc": 9104,
             "filer": 9105, "filer_grpc": 9106, "s3_grpc": 9107}

    def __init__(self, workdir: Path):
        self.dir = workdir
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        self.access_key = "PRIVATE" + uuid.uuid4().hex[:13].upper()
        self.secret_key = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        (workdir / "s3.json").write_text(json.dumps({"identities": [{
            "name": "test", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        self.proc: subprocess.Popen | None = None
        self.endpoint = "http://127.0.0.1:%d" % self.PORTS["s3"]

    def source(self, name: str = "private") -> DataSource:
        return DataSource(name=name, endpoint=self.endpoint, region="us-east-1",
                          access_key=self.access_key, secret_key=self.secret_key)

    def argv(self) -> list[str]:
        p = self.PORTS
        return [WEED, "server", "-dir=%s" % (self.dir / "data"), "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.port=%d" % p["master"], "-master.port.grpc=%d" % p["master_grpc"],
                "-master.telemetry=false", "-master.resumeState=false", "-master.volumeSizeLimitMB=64",
                "-volume.port=%d" % p["volume"], "-volume.port.grpc=%d" % p["volume_grpc"], "-volume.max=100",
                "-volume.preStopSeconds=0", "-filer", "-filer.port=%d" % p["filer"],
                "-filer.port.grpc=%d" % p["filer_grpc"], "-s3", "-s3.port=%d" % p["s3"],
                "-s3.port.grpc=%d" % p["s3_grpc"], "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-s3.config=%s" % (self.dir / "s3.json")]

    def start(self, timeout: float = 30.0) -> None:
        import socket
        for port in self.PORTS.values():
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    raise AssertionError("127.0.0.1:%d is already in use; the private SeaweedFS needs ports "
                                         "9100-9107 (is another test run going?)" % port)
        log = open(self.dir / "weed.log", "ab")
        try:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                         start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("weed exited %s; see %s" % (self.proc.returncode, self.dir / "weed.log"))
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
            except urllib.error.HTTPError as e:
                e.close()
                if e.code == 403:                     # serving (anonymous requests are refused)
                    if self._can_write():
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise AssertionError("private SeaweedFS not ready after %ss; see %s" % (timeout, self.dir / "weed.log"))

    def _can_write(self) -> bool:
        try:
            with S3Store(self.source(), workers=1, connect_timeout=1, read_timeout=5) as s:
                try:
                    s.client.create_bucket(Bucket="readiness")
                except s.client.exceptions.BucketAlreadyOwnedByYou:
                    pass
                except s.client.exceptions.BucketAlreadyExists:
                    pass
                s.client.put_object(Bucket="readiness", Key="probe", Body=b"1")
            return True
        except Exception:  # noqa: BLE001 - not ready yet
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def cleanup(self) -> None:
        self.kill()
        for port in self.PORTS.values():
            for sock in glob.glob("/tmp/seaweedfs-*-%d.sock" % port):
                try:
                    os.unlink(sock)
                except OSError:
                    pass

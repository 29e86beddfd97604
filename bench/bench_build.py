"""The platform's two-line Dockerfile (``FROM`` the site's TensorFlow base, ``ADD ./code/
/data/code/`` with 10 MB of code) built and pushed through the portal, against a bare buildah
build and push of the same context as the same user, in the same run; and the bytes the push
sent against the size of the new layer.

    .venv/bin/python bench/bench_build.py [--rounds 3] [--code-mb 10]

Run as root after `make run` (dev cluster: the deployed portal on https://127.0.0.1:8443, the registry on
https://localhost:5000). As alice: a token of the bench's own (revoked at the end), her registry
account (from /etc/aiportal/secrets/registry_password_alice). Each round writes new random
code (so every build has a new layer), then, in alternating order:

* portal: ``aiportal image build --tag localhost:5000/alice/bench-build:N CONTEXT`` (upload,
  a Slurm job running buildah rootless as alice, push; the CLI returns once the push is done);
* bare: ``buildah bud`` + ``buildah push`` run directly as alice with her build storage (the
  same driver and store).

Targets: the portal's build < 15 s end to end, and the bytes the push uploaded (the registry's
log: the blobs PUT into the repository, and their sizes in its storage) within 10% of the new
layer. The repository's tags are deleted at the end.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HOST = "localhost:5000"
REPO = "alice/bench-build"
BASE = "localhost:5000/site/tensorflow:2.21"
REGISTRY_LOG = Path("/var/log/aiportal/registry.log")
BLOBS = Path("/var/lib/aiportal/registry/docker/registry/v2/blobs/sha256")
STORAGE = "/var/tmp/aiportal-build-alice"       # Settings.image_build_storage for alice
DRIVER = "overlay"                               # Settings.image_build_storage_driver
PASSWORD = Path("/etc/aiportal/secrets/registry_password_alice")


def aiportal(*args, env=None, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(["aiportal", *args], capture_output=True, text=True, env=env, timeout=900, check=check)


def uploaded_since(mark: int) -> list[str]:
    with open(REGISTRY_LOG, "rb") as f:
        f.seek(mark)
        text = f.read().decode("utf-8", "replace")
    return re.findall(r'"PUT /v2/%s/blobs/uploads/\S*digest=sha256%%3A([0-9a-f]{64})' % re.escape(REPO), text)


def blob_size(hexd: str) -> int:
    return (BLOBS / hexd[:2] / hexd / "data").stat().st_size


def layer_of(tag: str, password: str) -> tuple[str, int]:
    """The last layer of the pushed image (the new one) and its size."""
    req = urllib.request.Request("https://%s/v2/%s/manifests/%s" % (HOST, REPO, tag), headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        "Authorization": "Basic " + base64.b64encode(("alice:%s" % password).encode()).decode()})
    with urllib.request.urlopen(req, timeout=30) as resp:
        manifest = json.load(resp)
    layer = manifest["layers"][-1]
    return layer["digest"], layer["size"]


def write_context(folder: Path, mb: int) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "code").mkdir(parents=True)
    (folder / "Dockerfile").write_text("FROM %s\nADD ./code/ /data/code/\n" % BASE)
    for i in range(mb):
        (folder / "code" / ("weights-%02d.bin" % i)).write_bytes(os.urandom(1 << 20))
    (folder / "code" / "train.py").write_text("print('hello')\n")
    alice = pwd.getpwnam("alice")
    for p in [folder, *folder.rglob("*")]:
        os.chown(p, alice.pw_uid, alice.pw_gid)
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def bare_build(ctx: Path, tag: str, password: str, work: Path) -> None:
    alice = pwd.getpwnam("alice")
    auth = work / ("auth-%s.json" % tag)
    fd = os.open(auth, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, json.dumps({"auths": {HOST: {"auth": base64.b64encode(("alice:%s" % password).encode()).decode()}}})
             .encode())
    os.fchown(fd, alice.pw_uid, alice.pw_gid)
    os.close(fd)
    b = ["buildah", "--storage-driver", DRIVER, "--root", "%s/%s" % (STORAGE, "root" if DRIVER == "vfs" else
                                                                     "root-" + DRIVER), "--runroot", STORAGE + "/runroot"]
    env = ["env", "HOME=%s/home" % STORAGE, "XDG_RUNTIME_DIR=%s/run" % STORAGE, "TMPDIR=%s/tmp" % STORAGE]
    name = "%s/%s:%s" % (HOST, REPO, tag)
    try:
        for argv in (b + ["bud", "--isolation", "chroot", "--authfile", str(auth), "-t", name, str(ctx)],
                     b + ["push", "--authfile", str(auth), name, "docker://" + name],
                     b + ["rmi", "--force", name]):
            res = subprocess.run(["runuser", "-u", "alice", "--", *env, *argv], capture_output=True, text=True,
                                 timeout=900, cwd="/")
            if res.returncode != 0:
                raise SystemExit("bare build failed: %s\n%s" % (" ".join(argv), res.stderr[-2000:]))
    finally:
        auth.unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--code-mb", type=int, default=10)
    args = ap.parse_args()
    password = PASSWORD.read_text().strip()
    token = aiportal("token", "create", "--user", "alice", "--name", "bench-build").stdout.strip()
    env = dict(os.environ, AIPORTAL_TOKEN=token)
    work = Path(tempfile.mkdtemp(prefix="bench-build-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    times: dict[str, list[float]] = {"portal": [], "bare": []}
    sent, layers = [], []
    tags = []
    try:
        p = subprocess.run(["aiportal", "registry", "login", HOST, "--username", "alice", "--password-stdin"],
                           input=password, capture_output=True, text=True, env=env, timeout=60)
        if p.returncode != 0:
            raise SystemExit("registry login failed: %s" % p.stderr)
        # warm-up: the base image's layers into alice's build storage (once per node and base)
        write_context(work / "ctx", 1)
        t0 = time.perf_counter()
        aiportal("image", "build", "-q", "--tag", "%s/%s:warm" % (HOST, REPO), str(work / "ctx"), env=env)
        tags.append("warm")
        print("warm-up build (the base's layers into alice's storage, if not there yet): %.1f s"
              % (time.perf_counter() - t0))
        for r in range(args.rounds):
            for which in (("portal", "bare") if r % 2 == 0 else ("bare", "portal")):
                write_context(work / "ctx", args.code_mb)
                tag = "%s-%d" % (which, r)
                mark = REGISTRY_LOG.stat().st_size
                t0 = time.perf_counter()
                if which == "portal":
                    aiportal("image", "build", "-q", "--tag", "%s/%s:%s" % (HOST, REPO, tag), str(work / "ctx"),
                             env=env)
                else:
                    bare_build(work / "ctx", tag, password, work)
                took = time.perf_counter() - t0
                tags.append(tag)
                times[which].append(took)
                up = sum(blob_size(h) for h in set(uploaded_since(mark)))
                digest, size = layer_of(tag, password)
                if which == "portal":
                    sent.append(up)
                    layers.append(size)
                print("  round %d %-6s %.1f s; uploaded %.2f MB (new layer %.2f MB: %.3fx)"
                      % (r + 1, which, took, up / 1e6, size / 1e6, up / size))
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = max(s / layer for s, layer in zip(sent, layers))
        print("portal build + push of %d MB of code onto %s: %.1f s (median of %d; target < 15 s: %s); a bare "
              "buildah bud + push as alice %.1f s: %.2fx" % (args.code_mb, BASE, med["portal"], len(times["portal"]),
                                                            "met" if med["portal"] < 15 else "NOT met", med["bare"],
                                                            med["portal"] / med["bare"]))
        print("bytes uploaded by the portal's pushes: at most %.3fx the new layer (target <= 1.10x: %s)"
              % (ratio, "met" if ratio <= 1.10 else "NOT met"))
        return 0
    finally:
        for tag in tags:
            try:
                digest = layer_of(tag, password)   # noqa: F841 (exists)
                req = urllib.request.Request("https://%s/v2/%s/manifests/%s" % (HOST, REPO, tag), method="HEAD",
                                             headers={"Accept": "application/vnd.oci.image.manifest.v1+json",
                                                      "Authorization": "Basic " + base64.b64encode(
                                                          ("alice:%s" % password).encode()).decode()})
                with urllib.request.urlopen(req, timeout=30) as resp:
                    mdigest = resp.headers["Docker-Content-Digest"]
                req = urllib.request.Request("https://%s/v2/%s/manifests/%s" % (HOST, REPO, mdigest), method="DELETE",
                                             headers={"Authorization": "Basic " + base64.b64encode(
                                                 ("alice:%s" % password).encode()).decode()})
                urllib.request.urlopen(req, timeout=30).close()
            except OSError:
                pass
        ids = json.loads(aiportal("token", "list", "--user", "alice", "--json").stdout)
        for t in ids:
            if t["name"] == "bench-build" and not t["revoked"]:
                aiportal("token", "revoke", "--user", "alice", str(t["id"]), check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

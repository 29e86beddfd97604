"""Registry images: a cache hit with the authorization check, and a cold pull + conversion
against a bare ``apptainer pull`` of the same reference, in the same run.

    .venv/bin/python bench/bench_registry.py [--sif BASE.sif] [--hits 200] [--rounds 3]

Against the dev cluster's registry (https://localhost:5000, TLS verified with the dev CA; run
after `make run`, as root). Publishes the base image (debian-python, 56 MB) as
``alice/bench-<random>:1`` with alice's account (password from /etc/aiportal/secrets), then:

1. hit: what a submission does for a registry reference whose SIF is cached, in-process on a
   SQLite database: ``images.pin_image`` (the tag resolved to its digest with alice's account:
   one HEAD over TLS; the access cache off, so every call asks the registry) and
   ``images.request_image`` (the cache lookup). Target: p50 < 50 ms. Baseline, same run: the
   same for a .sif path (no registry).
2. cold: ``aiportal image convert docker://...@DIGEST --authfile F --cache EMPTY`` (what the
   conversion job runs: pull, convert with zstd, into the cache) vs ``apptainer pull
   --authfile F OUT.sif docker://...@DIGEST`` (default squashfs compression) and ``apptainer
   build`` with the conversion's zstd squashfs (aiportal's own overhead), each with an empty
   apptainer cache; the order rotated, ``--rounds`` each. Target: <= 1.1x.
The test repository is deleted at the end (blobs stay until the registry's garbage collection).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import pwd
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from containers.builder import archives_from_sif  # noqa: E402
from containers.registry import RegistryAuth, RegistryClient, RegistryConfig, write_authfile  # noqa: E402

BASE_GLOB = "/srv/aiportal/shared/images/base/debian-python-*.sif"
HOST = "localhost:5000"
REPO = Path(__file__).resolve().parents[1]


def p(values, q):
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def timed(fn, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def delete_repo(auth: RegistryAuth, repo: str, digest: str) -> None:
    import base64
    req = urllib.request.Request("https://%s/v2/%s/manifests/%s" % (HOST, repo, digest), method="DELETE",
                                 headers={"Authorization": "Basic " + base64.b64encode(
                                     ("%s:%s" % (auth.username, auth.password)).encode()).decode()})
    try:
        urllib.request.urlopen(req, timeout=10).close()
    except OSError as e:
        print("could not delete %s: %s" % (repo, e), file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sif", help="base SIF (default: newest %s)" % BASE_GLOB)
    ap.add_argument("--hits", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    sif = Path(args.sif) if args.sif else max(map(Path, glob.glob(BASE_GLOB)), key=lambda x: x.stat().st_mtime,
                                              default=None)
    if sif is None:
        print("no base SIF: make test builds %s" % BASE_GLOB, file=sys.stderr)
        return 2
    auth = RegistryAuth("alice", Path("/etc/aiportal/secrets/registry_password_alice").read_text().strip())
    repo = "alice/bench-%s" % secrets.token_hex(4)
    work = Path(tempfile.mkdtemp(prefix="bench-registry-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    digest = None
    try:
        image = archives_from_sif(sif, work / "image", name="bench/py")
        authfile = write_authfile(work / "auth.json", {HOST: auth})
        subprocess.run(["skopeo", "copy", "-q", "--authfile", str(authfile), "oci-archive:%s" % image.oci_archive,
                        "docker://%s/%s:1" % (HOST, repo)], check=True, timeout=600)
        digest = RegistryClient(HOST, auth, RegistryConfig()).resolve(repo, "1")
        pinned = "docker://%s/%s@%s" % (HOST, repo, digest)
        print("base %s published as %s/%s:1 (%s)" % (sif.name, HOST, repo, digest[:19]))

        # -- 2. cold pull + conversion vs bare apptainer pull ------------------------------------
        builder = pwd.getpwnam("aiportal-img")
        times = {"ours": [], "bare": [], "zstd": []}
        order = ["ours", "bare", "zstd"]
        for r in range(args.rounds):
            for which in order[r % 3:] + order[:r % 3]:
                d = work / ("%s-%d" % (which, r))
                d.mkdir()
                if which == "ours":
                    os.chown(d, builder.pw_uid, builder.pw_gid)
                    handed = write_authfile(d / "auth.json", {HOST: auth}, builder.pw_uid, builder.pw_gid)
                    argv = [str(REPO / ".venv/bin/aiportal"), "image", "convert", pinned, "--cache", str(d / "cache"),
                            "--authfile", str(handed)]
                    (d / "cache").mkdir()
                    os.chown(d / "cache", builder.pw_uid, builder.pw_gid)
                    env = dict(os.environ)
                elif which == "bare":
                    argv = ["apptainer", "pull", "--authfile", str(authfile), str(d / "out.sif"), pinned]
                    env = dict(os.environ, APPTAINER_CACHEDIR=str(d / "acache"), APPTAINER_TMPDIR=str(d))
                else:       # what the conversion runs, bare: apptainer build with the same zstd squashfs
                    argv = ["apptainer", "build", "--authfile", str(authfile), "--mksquashfs-args",
                            "-comp zstd -Xcompression-level 3", str(d / "out.sif"), pinned]
                    env = dict(os.environ, APPTAINER_CACHEDIR=str(d / "acache"), APPTAINER_TMPDIR=str(d))
                t0 = time.perf_counter()
                res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
                took = time.perf_counter() - t0
                if res.returncode != 0:
                    print("%s failed: %s\n%s" % (which, " ".join(argv), res.stderr[-2000:]), file=sys.stderr)
                    return 1
                times[which].append(took)
                print("  round %d %-4s %.1f s" % (r + 1, which, took))
                shutil.rmtree(d, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["ours"] / med["bare"]
        print("cold: pull + conversion into the cache %.1f s (median of %d) vs bare `apptainer pull` %.1f s: %.2fx "
              "(target <= 1.1x: %s); vs bare `apptainer build` with the same zstd squashfs %.1f s: %.2fx "
              "(aiportal's own overhead)" % (med["ours"], len(times["ours"]), med["bare"], ratio,
                                             "met" if ratio <= 1.1 else "NOT met", med["zstd"],
                                             med["ours"] / med["zstd"]))

        # -- 1. cache hit with the authorization check ----------------------------------------------
        from cryptography.fernet import Fernet
        from sqlmodel import Session
        from portal import db as dbmod
        from portal.services import accounts, images, registries
        from portal.settings import Settings
        from storage.credentials import SecretBox
        cache = work / "hitcache"
        (cache / "sha256").mkdir(parents=True)
        (cache / "sha256" / ("%s.sif" % digest.split(":")[1])).write_bytes(sif.read_bytes()[:4096])
        key = Fernet.generate_key().decode()
        settings = Settings.from_mapping({"secret_key": "s" * 64, "data_key": key, "admin_token_sha256": "0" * 64,
                                          "database_url": "sqlite:///%s/portal.db" % work,
                                          "image_cache": str(cache), "registry_access_ttl_s": 0})
        engine = dbmod.make_engine(settings.database_url)
        dbmod.upgrade(engine)
        box = SecretBox(key)
        with Session(engine) as db:
            user = accounts.add_user(db, "bench-alice", "alice")
            db.commit()
            registries.login(db, settings, box, user, HOST, auth.username, auth.password)
            tag = "docker://%s/%s:1" % (HOST, repo)

            def hit(ref=tag):
                text, a = images.pin_image(db, settings, box, user, ref)
                req = images.request_image(settings, None, text, user="alice", auth=a)
                assert req.conversion_job is None

            def sif_hit():
                text, a = images.pin_image(db, settings, box, user, str(sif))
                images.request_image(settings, None, text, user=None, auth=a)
            for _ in range(5):
                hit()
            reg = timed(hit, args.hits)
            base = timed(sif_hit, args.hits)
        engine.dispose()
        print("hit: registry reference (tag -> digest over TLS with alice's account, every time) p50 %.1f ms, p95 "
              "%.1f ms over %d; a .sif path p50 %.2f ms (target p50 < 50 ms: %s)"
              % (p(reg, 50) * 1e3, p(reg, 95) * 1e3, len(reg), p(base, 50) * 1e3,
                 "met" if p(reg, 50) < 0.05 else "NOT met"))
        print(json.dumps({"hit_p50_ms": round(p(reg, 50) * 1e3, 2), "cold_ratio": round(ratio, 3)}))
        return 0
    finally:
        if digest:
            delete_repo(auth, repo, digest)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

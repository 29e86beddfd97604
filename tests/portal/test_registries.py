"""Registry accounts and registry images through the API, against a real registry (the
throwaway one of tests/registries.py; Slurm is the recording backend here: what is submitted is
checked, nothing runs)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from pathlib import Path

import pytest
from sqlmodel import Session, select

from portal.models import Job, RegistryCredential
from portal.services import registries
from tests.portal.conftest import bearer
from tests.registries import PASSWORDS, SITE, registry  # noqa: F401 (fixture)

pytestmark = pytest.mark.portal
DOWN = "127.0.0.1:9179"      # allowed, nothing listens there


@pytest.fixture
def reg_settings(settings, registry, tmp_path):
    import pwd
    import shutil
    import tempfile
    cache = Path(tempfile.mkdtemp(prefix="aiportal-test-cache-", dir="/var/tmp"))   # the builder account reads it
    os.chmod(cache, 0o755)
    b = pwd.getpwnam(settings.image_builder_user)
    os.chown(cache, b.pw_uid, b.pw_gid)
    site_file = tmp_path / "site-images.json"
    pw_file = tmp_path / "site-pw"
    pw_file.write_text(SITE[1])
    registries.forget_access(0)
    yield dataclasses.replace(settings, **{"registry_insecure": (registry.host,), "registries_allowed": (DOWN,), "image_cache": str(cache),
                                       "site_registry": registry.host, "site_registry_user": SITE[0],
                                       "site_registry_password_file": str(pw_file),
                                       "site_images_file": str(site_file)})
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture
def rclient(reg_settings, engine, users, fake_backend):
    from portal.app import create_app
    app = create_app({"TESTING": True}, settings=reg_settings, engine=engine, backend=fake_backend)
    for u in users.values():
        registries.forget_access(u.id)
    return app.test_client()


def login(client, tokens, registry, user="alice", password=None):
    return client.post("/api/v1/registries", headers=bearer(tokens[user]),
                       json={"registry": registry.host, "username": user,
                             "password": PASSWORDS[user] if password is None else password})


def job(image):
    return {"image": image, "node_type": "1card", "command": ["true"]}


def test_an_account_is_checked_then_kept_sealed(rclient, tokens, registry, engine):
    r = login(rclient, tokens, registry, password="wrong")
    assert r.status_code == 422 and "password" in r.get_json()["errors"], r.get_json()
    r = login(rclient, tokens, registry)
    assert r.status_code == 201, r.get_json()
    assert PASSWORDS["alice"] not in r.get_data(as_text=True)
    listed = rclient.get("/api/v1/registries", headers=bearer(tokens["alice"])).get_json()["registries"]
    assert [(x["registry"], x["username"]) for x in listed] == [(registry.host, "alice")]
    assert rclient.get("/api/v1/registries", headers=bearer(tokens["bob"])).get_json()["registries"] == []
    with Session(engine) as db:
        rows = list(db.exec(select(RegistryCredential)))
    assert len(rows) == 1 and PASSWORDS["alice"] not in rows[0].password_sealed
    assert rclient.delete("/api/v1/registries/%s" % registry.host, headers=bearer(tokens["bob"])).status_code == 404
    assert rclient.delete("/api/v1/registries/%s" % registry.host, headers=bearer(tokens["alice"])).status_code == 204


def test_a_registry_that_is_down_is_a_503_and_nothing_is_stored(rclient, tokens, engine):
    r = rclient.post("/api/v1/registries", headers=bearer(tokens["alice"]),
                     json={"registry": DOWN, "username": "alice", "password": "x"})
    assert r.status_code == 503 and "nothing was stored" in r.get_json()["message"]
    r = rclient.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json=job("docker://%s/a/b:1" % DOWN))
    assert r.status_code == 503
    with Session(engine) as db:
        assert list(db.exec(select(RegistryCredential))) == [] and list(db.exec(select(Job))) == []


def test_a_job_runs_its_image_pinned_and_the_conversion_pulls_with_a_private_authfile(
        rclient, tokens, registry, engine, fake_backend, reg_settings):
    assert login(rclient, tokens, registry).status_code == 201
    r = rclient.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json=job("docker://%s/site/base:1" % registry.host))
    assert r.status_code == 201, r.get_json()
    digest = re.search(r"@(sha256:[0-9a-f]{64})$", r.get_json()["image"]).group(1)
    assert r.get_json()["image"] == "docker://%s/site/base@%s" % (registry.host, digest)
    with Session(engine) as db:
        stored = db.exec(select(Job)).one()
    assert json.loads(stored.request_json)["image"] == stored.image       # a resubmit runs the same digest
    (convert, builder), (script, user) = fake_backend.submitted
    assert builder == reg_settings.image_builder_user and user == "alice"
    argv = re.search(r"^.*image convert.*$", convert, re.M).group(0)
    assert "docker://%s/site/base@%s" % (registry.host, digest) in argv
    authfile = re.search(r"--authfile '?(\S+?\.json)", argv).group(1)
    st = os.stat(authfile)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid != 0
    for text in (convert, script, r.get_data(as_text=True), stored.request_json):
        assert PASSWORDS["alice"] not in text
    assert "--dependency=afterok:%s" % list(fake_backend.jobs)[0] in script


def test_a_tag_that_does_not_exist_is_refused_and_nothing_is_stored(rclient, tokens, registry, engine, fake_backend):
    assert login(rclient, tokens, registry).status_code == 201
    for ref in ("docker://%s/site/base:nope" % registry.host, "docker://%s/nobody/x:1" % registry.host):
        r = rclient.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json=job(ref))
        assert r.status_code == 422 and "image" in r.get_json()["errors"], r.get_json()
        assert ref in r.get_json()["errors"]["image"]
    with Session(engine) as db:
        assert list(db.exec(select(Job))) == []
    assert fake_backend.submitted == []


def test_a_cached_image_is_not_handed_to_a_user_whose_account_cannot_read_it(
        rclient, tokens, registry, reg_settings, fake_backend):
    from containers.cache import SifCache
    assert login(rclient, tokens, registry).status_code == 201
    r = rclient.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json=job("docker://%s/alice/base:1" % registry.host))
    assert r.status_code == 422          # not pushed there: alice/base does not exist
    pinned = rclient.post("/api/v1/jobs", headers=bearer(tokens["alice"]),
                          json=job("docker://%s/site/base:1" % registry.host)).get_json()["image"]
    digest = pinned.rsplit("@", 1)[1]
    sif = SifCache(reg_settings.image_cache).path_for(digest)
    sif.parent.mkdir(parents=True, exist_ok=True)
    sif.write_bytes(b"cached")           # as if the conversion had run
    before = len(fake_backend.submitted)
    # bob has no account at this registry: the exact digest does not get him the cached SIF, and
    # the answer is the one for a digest nobody ran (it does not tell him the image is cached)
    answers = set()
    for d in (digest, "sha256:" + "0" * 64):
        ref = "docker://%s/alice/private@%s" % (registry.host, d)
        r = rclient.post("/api/v1/jobs", headers=bearer(tokens["bob"]), json=job(ref))
        assert r.status_code == 422 and ref in r.get_json()["errors"]["image"], r.get_json()
        answers.add((r.status_code, r.get_json()["message"].replace(ref, "REF")))
    assert len(answers) == 1, answers
    assert len(fake_backend.submitted) == before
    # alice, who can read it, runs it from the cache: no conversion job
    r = rclient.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json=job(pinned))
    assert r.status_code == 201
    (script, user), = fake_backend.submitted[before:]
    assert str(sif) in script and "--dependency" not in script


def test_access_to_a_digest_is_trusted_briefly_then_asked_again(rclient, tokens, registry, reg_settings):
    assert login(rclient, tokens, registry).status_code == 201
    pinned = rclient.post("/api/v1/jobs", headers=bearer(tokens["alice"]),
                          json=job("docker://%s/site/base:1" % registry.host)).get_json()["image"]
    mark = registry.mark()
    assert rclient.get("/api/v1/images/check?ref=" + pinned, headers=bearer(tokens["alice"])).get_json()["ok"]
    assert "/manifests/" not in registry.log.read_bytes()[mark:].decode()       # trusted (ttl 60 s)
    for u in (1, 2, 3):
        registries.forget_access(u)
    assert rclient.get("/api/v1/images/check?ref=" + pinned, headers=bearer(tokens["alice"])).get_json()["ok"]
    assert "/manifests/" in registry.log.read_bytes()[mark:].decode()           # asked again


def test_choices_and_checks(rclient, tokens, registry, reg_settings):
    from containers.registry import RegistryAuth, RegistryClient, RegistryConfig
    digest = RegistryClient(registry.host, RegistryAuth(*SITE), RegistryConfig(insecure=frozenset({registry.host}))
                            ).resolve("site/base", "1")
    with open(reg_settings.site_images_file, "w") as f:
        json.dump({"format": "aiportal-site-images/1", "images": [
            {"name": "base", "ref": "docker://%s/site/base:1" % registry.host, "digest": digest,
             "title": "Busybox", "description": "small", "framework": "none"}]}, f)
    ans = rclient.get("/api/v1/images/choices", headers=bearer(tokens["bob"])).get_json()
    assert [s["ref"] for s in ans["site"]] == ["docker://%s/site/base:1" % registry.host]
    assert ans["repositories"] == [] and ans["recent"] == []
    # the site's base image is readable by bob, who has no account: with the site's read account
    check = rclient.get("/api/v1/images/check?ref=docker://%s/site/base:1" % registry.host,
                        headers=bearer(tokens["bob"])).get_json()
    assert check["ok"] and check["pinned"].endswith(digest) and not check["cached"]
    assert login(rclient, tokens, registry).status_code == 201
    ans = rclient.get("/api/v1/images/choices", headers=bearer(tokens["alice"])).get_json()
    repo = next(r for r in ans["repositories"] if r["repository"] == "site/base")
    assert repo["tags"] == ["1"] and repo["refs"] == ["docker://%s/site/base:1" % registry.host]
    bad = rclient.get("/api/v1/images/check?ref=docker://%s/site/base:nope" % registry.host,
                      headers=bearer(tokens["alice"])).get_json()
    assert not bad["ok"] and "does not exist" in bad["message"]
    assert not rclient.get("/api/v1/images/check?ref=docker://Bad", headers=bearer(tokens["alice"])).get_json()["ok"]


def test_the_portal_connects_to_no_registry_the_site_does_not_use(rclient, tokens, engine, fake_backend):
    for ref in ("docker://ubuntu:22.04", "docker://10.1.2.3:80/x/y:1", "docker://metadata.internal/a:1"):
        r = rclient.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json=job(ref))
        assert r.status_code == 422 and "not one this site uses" in r.get_json()["errors"]["image"], r.get_json()
        check = rclient.get("/api/v1/images/check?ref=" + ref, headers=bearer(tokens["alice"])).get_json()
        assert not check["ok"] and "not one this site uses" in check["message"]
    r = rclient.post("/api/v1/registries", headers=bearer(tokens["alice"]),
                     json={"registry": "169.254.169.254", "username": "a", "password": "b"})
    assert r.status_code == 422 and "registry" in r.get_json()["errors"]
    with Session(engine) as db:
        assert list(db.exec(select(Job))) == [] and list(db.exec(select(RegistryCredential))) == []


def test_a_service_from_a_registry_image_waits_for_its_conversion(rclient, tokens, registry, fake_backend):
    assert login(rclient, tokens, registry).status_code == 201
    r = rclient.post("/api/v1/services", headers=bearer(tokens["alice"]),
                     json={"name": "reg-svc", "image": "docker://%s/site/base:1" % registry.host,
                           "model": "/srv/aiportal/shared/users/alice/models/none"})
    assert r.status_code == 409 and "being converted" in r.get_json()["message"], r.get_json()
    (convert, builder), = fake_backend.submitted
    assert "image convert docker://%s/site/base@sha256:" % registry.host in convert
    r = rclient.post("/api/v1/services", headers=bearer(tokens["alice"]),
                     json={"name": "reg-svc", "image": "docker://%s/site/base:nope" % registry.host, "model": "/x"})
    assert r.status_code == 422 and "image" in r.get_json()["errors"]


@pytest.mark.parametrize("ref", [
    "docker://{host}/site/base:1;rm -rf /", "docker://{host}/site/base:$(id)", "docker://{host}/../etc/passwd:1",
    "docker://{host}/Site/Base:1", "docker://{host}/site/base:" + "x" * 200, "docker://{host}/site/base@sha256:abc",
    "docker://{host}/site/base:1 --authfile /etc/shadow", "docker://{host}/site/base:`id`"])
def test_hostile_references_are_refused_before_anything_happens(rclient, tokens, registry, engine, fake_backend, ref):
    mark = registry.mark()
    r = rclient.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json=job(ref.format(host=registry.host)))
    assert r.status_code == 422 and "image" in r.get_json()["errors"], r.get_json()
    with Session(engine) as db:
        assert list(db.exec(select(Job))) == []
    assert fake_backend.submitted == [] and registry.log.read_bytes()[mark:].count(b"/manifests/") == 0


def test_a_tag_moved_after_submission_does_not_change_what_the_job_runs(
        rclient, tokens, registry, fake_backend, reg_settings, tmp_path):
    """The conversion pulls the digest the submission pinned, whatever the tag points at by then."""
    import subprocess
    from tests.conftest import run
    assert login(rclient, tokens, registry).status_code == 201
    repo = "alice/moving-%s" % os.urandom(3).hex()
    creds = ["--creds", "alice:%s" % PASSWORDS["alice"]]
    run(["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false", "--src-creds", "%s:%s" % SITE,
         *[c.replace("--creds", "--dest-creds") for c in creds],
         "docker://%s/site/base:1" % registry.host, "docker://%s/%s:1" % (registry.host, repo)], timeout=120)
    r = rclient.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json=job("docker://%s/%s:1" % (registry.host, repo)))
    assert r.status_code == 201, r.get_json()
    pinned = r.get_json()["image"]
    # the tag moves: a new image with /marker is pushed under it
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "marker").write_text("moved\n")
    (ctx / "Dockerfile").write_text("FROM %s/site/base:1\nCOPY marker /marker\n" % registry.host)
    b = ["buildah", "--storage-driver", "vfs", "--root", str(tmp_path / "bs"), "--runroot", str(tmp_path / "bsr")]
    run(b + ["bud", "--isolation", "chroot", "--tls-verify=false", "--creds", "%s:%s" % SITE,
             "-t", "%s/%s:1" % (registry.host, repo), str(ctx)], timeout=180)
    run(b + ["push", "--tls-verify=false", *creds, "%s/%s:1" % (registry.host, repo)], timeout=120)
    check = rclient.get("/api/v1/images/check?ref=docker://%s/%s:1" % (registry.host, repo),
                        headers=bearer(tokens["alice"])).get_json()
    assert check["pinned"] != pinned
    # the conversion job the submission made, run now: it converts the pinned image, without /marker
    convert = fake_backend.submitted[0][0]
    argv = re.search(r"^exec (\S+) image convert (.*)$", convert, re.M)
    args = argv.group(2).replace("'", "").split()
    res = subprocess.run([str(Path(__file__).resolve().parents[1] / "builds" / "aiportal-checkout"), "image", "convert",
                          *args], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, AIPORTAL_REGISTRY_INSECURE='["%s"]' % registry.host))
    assert res.returncode == 0, res.stderr
    sif = res.stdout.strip().splitlines()[-1]
    assert pinned.rsplit("@sha256:", 1)[1] in sif
    out = subprocess.run(["apptainer", "exec", sif, "/bin/busybox", "sh", "-c", "cat /marker 2>/dev/null || echo none"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "none", out


def test_a_layer_whose_digest_does_not_match_fails_the_conversion_and_leaves_nothing(
        rclient, tokens, fake_backend, reg_settings, tmp_path_factory):
    """A registry that serves a layer whose bytes do not match its digest (corrupted storage):
    the conversion refuses it, and the cache holds no SIF and no partial file afterwards."""
    import subprocess
    from tests.registries import running_registry
    with running_registry(tmp_path_factory.mktemp("corrupt-registry"), ports=range(9165, 9170)) as reg:
        settings = dataclasses.replace(reg_settings, registry_insecure=(*reg_settings.registry_insecure, reg.host))
        from portal.app import create_app
        client = create_app({"TESTING": True}, settings=settings, engine=rclient.application.extensions[
            "aiportal.engine"], backend=fake_backend).test_client()
        r = client.post("/api/v1/registries", headers=bearer(tokens["alice"]),
                        json={"registry": reg.host, "username": "alice", "password": PASSWORDS["alice"]})
        assert r.status_code == 201, r.get_json()
        r = client.post("/api/v1/jobs", headers=bearer(tokens["alice"]), json=job("docker://%s/site/base:1" % reg.host))
        assert r.status_code == 201, r.get_json()
        blobs = sorted((reg.root / "data/docker/registry/v2/blobs/sha256").glob("*/*/data"),
                       key=lambda p: p.stat().st_size)
        layer = blobs[-1]                       # the busybox layer, the largest blob
        data = bytearray(layer.read_bytes())
        data[len(data) // 2] ^= 0xFF
        layer.write_bytes(bytes(data))
        convert = fake_backend.submitted[0][0]
        args = re.search(r"^exec (\S+) image convert (.*)$", convert, re.M).group(2).replace("'", "").split()
        res = subprocess.run([str(Path(__file__).resolve().parents[1] / "builds" / "aiportal-checkout"), "image",
                              "convert", *args], capture_output=True, text=True, timeout=600,
                             env=dict(os.environ, AIPORTAL_REGISTRY_INSECURE='["%s"]' % reg.host))
    assert res.returncode != 0
    assert "error verifying sha256 checksum" in res.stderr, res.stderr[-2000:]
    cache = Path(settings.image_cache) / "sha256"
    assert [p.name for p in cache.iterdir() if p.suffix in (".sif", ".partial") or "partial" in p.name] == []

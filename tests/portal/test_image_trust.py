"""Other users' paths and objects answer "not found, or not yours", exactly as missing ones do
(the API, the pages, the CLI); an image file the user cannot read is refused at submission (422
naming the field); a registered image must exist; images can be deleted by their owner or an
admin, and their cached SIF goes only when nothing else uses it.

The private files are made by each test in a throwaway folder of its own, owned by bob (0700);
alice's and bob's own folders and objects are not touched."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from sqlmodel import Session, select

from portal.models import Image, ImageState, Job, Service
from slurm.states import JobState
from tests.portal.conftest import TEST_SIF, api_call, bearer, csrf_of, login, start_test_portal
from tests.portal.test_browser import browser  # noqa: F401 (fixture)

HEX = "ab" * 32
DIGEST = "sha256:" + HEX


@pytest.fixture
def private(tmp_path):
    """Three image paths alice cannot use, told apart only by why: one in a folder of bob's she
    cannot enter, one readable folder's file only bob may read, one that does not exist."""
    root = Path(tempfile.mkdtemp(prefix="trust-", dir=Path(TEST_SIF).parent))
    os.chmod(root, 0o755)
    closed, open_ = root / "closed", root / "open"
    closed.mkdir(mode=0o700)
    open_.mkdir(mode=0o755)
    paths = {"closed": closed / "model.sif", "unreadable": open_ / "model.sif", "missing": open_ / "none.sif"}
    for p in (paths["closed"], paths["unreadable"]):
        p.write_bytes(b"bob's image\n")
        os.chmod(p, 0o600)
        shutil.chown(p, "bob", "bob")
    shutil.chown(closed, "bob", "bob")
    yield {k: str(v) for k, v in paths.items()}
    shutil.rmtree(root, ignore_errors=True)


def shape(message: str, path: str) -> str:
    """The message with the path (or name) taken out: what must be the same for every refusal."""
    return re.sub(r"(?<![\w.])%s(?![\w])" % re.escape(path), "PATH", message)


def same_answers(answers: dict) -> None:
    """Every (status, body-with-the-path-removed) is the same, whatever the path was."""
    assert len(set(answers.values())) == 1, answers


# -- the API: services, jobs, images, the image check -------------------------------------------

def test_deploying_with_another_users_image_answers_like_a_missing_one(client, tokens, fake_backend, model_dir,
                                                                       private, engine):
    answers = {}
    for kind, path in private.items():
        r = client.post("/api/v1/services", headers=bearer(tokens["alice"]),
                        json={"name": "toy-%s" % kind, "image": path, "model": model_dir})
        body = r.get_json()
        assert list(body["errors"]) == ["image"], body
        answers[kind] = (r.status_code, body["error"], shape(body["message"], path))
    same_answers(answers)
    assert answers["missing"] == (422, "invalid", "image: PATH: not found, or not readable by your account "
                                                  "(Unix user alice)")
    with Session(engine) as db:
        assert db.exec(select(Service)).first() is None


def test_the_check_is_asked_as_the_user_for_missing_files_too(private, monkeypatch):
    """The same work for every path (no answer told apart by its time): one ``runuser`` as the
    user, whether the file is missing or someone else's."""
    from portal.services import images
    if os.geteuid() != 0:
        pytest.skip("the portal asks as the user only when it runs as root")
    seen = []
    real = subprocess.run

    def spy(argv, **kw):
        seen.append(argv)
        return real(argv, **kw)
    monkeypatch.setattr(images.subprocess, "run", spy)
    for path in private.values():
        assert not images.user_can_read("alice", path)
    assert images.user_can_read("alice", TEST_SIF)
    assert [a[:4] for a in seen] == [["runuser", "-u", "alice", "--"]] * 4


@pytest.mark.parametrize("form", ["{}", "docker-archive:{}"])
def test_a_job_with_an_image_the_user_cannot_read_is_refused_at_submission(client, tokens, fake_backend, private,
                                                                          engine, form):
    answers = {}
    for kind, path in private.items():
        r = client.post("/api/v1/jobs", headers=bearer(tokens["alice"]),
                        json={"image": form.format(path if form == "{}" else path.replace(".sif", ".tar")),
                              "node_type": "1card", "command": ["true"]})
        body = r.get_json()
        assert r.status_code == 422 and list(body["errors"]) == ["image"], body
        answers[kind] = shape(body["message"], path if form == "{}" else path.replace(".sif", ".tar"))
    same_answers(answers)
    assert fake_backend.submitted == []
    with Session(engine) as db:
        assert db.exec(select(Job)).first() is None      # nothing stored, not even FAILED
    r = client.post("/api/v1/jobs", headers=bearer(tokens["alice"]),
                    json={"image": TEST_SIF, "node_type": "1card", "command": ["true"]})
    assert r.status_code == 201, r.get_json()


def test_registering_an_image_that_does_not_exist_or_is_not_yours_is_refused(client, tokens, fake_backend, private,
                                                                            engine):
    answers = {}
    for kind, path in private.items():
        r = client.post("/api/v1/images", headers=bearer(tokens["alice"]), json={"ref": path})
        body = r.get_json()
        assert r.status_code == 422 and list(body["errors"]) == ["ref"], body
        answers[kind] = shape(body["message"], path)
    same_answers(answers)
    with Session(engine) as db:
        assert db.exec(select(Image)).first() is None
    r = client.post("/api/v1/images", headers=bearer(tokens["alice"]), json={"ref": TEST_SIF})
    assert r.status_code == 201 and r.get_json()["state"] == "READY"


def test_the_image_check_answers_alike(client, tokens, private):
    answers = {}
    for kind, path in private.items():
        r = client.get("/api/v1/images/check", headers=bearer(tokens["alice"]), query_string={"ref": path})
        assert r.status_code == 200 and r.get_json()["ok"] is False
        answers[kind] = shape(r.get_json()["message"], path)
    same_answers(answers)


def test_other_users_objects_answer_like_missing_ones(client, tokens, fake_backend, model_dir, engine, settings,
                                                      users):
    """Jobs, services, images, data sources, builds: bob asking for alice's gets what he gets for
    one that does not exist, but for the name."""
    from portal.models import DataSourceRecord, ImageBuild
    alice, bob = bearer(tokens["alice"]), bearer(tokens["bob"])
    job = client.post("/api/v1/jobs", headers=alice, json={"image": TEST_SIF, "node_type": "1card",
                                                            "command": ["true"]}).get_json()["id"]
    img = client.post("/api/v1/images", headers=alice, json={"ref": TEST_SIF}).get_json()["id"]
    assert client.post("/api/v1/services", headers=alice, json={"name": "toy", "image": TEST_SIF,
                                                                "model": model_dir}).status_code == 201
    with Session(engine) as db:
        db.add(DataSourceRecord(user_id=users["alice"].id, name="lab", endpoint="http://127.0.0.1:9",
                                access_key_sealed="x", secret_key_sealed="x"))
        db.add(ImageBuild(id=77, user_id=users["alice"].id, tag="localhost:5000/alice/x:1", build_dir="/nowhere"))
        db.commit()
    pairs = [("GET", "/jobs/%s", job, "00000000-0000-0000-0000-000000000000"),
             ("GET", "/services/%s", "toy", "nosuch"),
             ("DELETE", "/images/%s", img, 987654),
             ("GET", "/images/builds/%s", 77, 78),
             ("GET", "/datasources/%s/browse", "lab", "nosuch")]
    for method, rule, theirs, missing in pairs:
        answers = {}
        for which, name in (("theirs", theirs), ("missing", missing)):
            r = client.open("/api/v1" + rule % name, method=method, headers=bob)
            body = r.get_json()
            answers[which] = (r.status_code, body["error"], shape(body["message"], str(name)))
        same_answers(answers)
        assert answers["missing"][:2] == (404, "not_found") and ": not found, or not yours" in answers["missing"][2]


# -- the pages ----------------------------------------------------------------------------------

def test_the_job_and_service_forms_answer_alike(client, users, fake_backend, private, model_dir):
    assert login(client, "alice").status_code == 302
    token = csrf_of(client, "/tokens")
    for url, data in (("/jobs/new", {"name": "j", "node_type": "1card", "command": "true", "time_limit": "00:10:00",
                                     "inputs": "", "output": "", "env": "", "sweep": "", "action": "submit"}),
                      ("/services", {"name": "toy", "model": model_dir, "min_replicas": "1", "max_replicas": "1"})):
        answers = {}
        for kind, path in private.items():
            r = client.post(url, data={**data, "image": path, "csrf": token})
            page = r.get_data(as_text=True)
            err = re.search(r'id="err-image"[^>]*>([^<]*)<', page)
            assert r.status_code == 422 and err, page[-2000:]
            answers[kind] = shape(err.group(1), path)
        same_answers(answers)
        assert "not found, or not readable by your account" in answers["missing"]
    assert fake_backend.submitted == []


# -- deleting images ----------------------------------------------------------------------------

@pytest.fixture
def settings(settings, tmp_path):
    """A SIF cache and site images of the test's own (deleting must never reach the real cache)."""
    cache = tmp_path / "cache"
    (cache / "sha256").mkdir(parents=True)
    return replace(settings, image_cache=str(cache), site_images_file=str(tmp_path / "site-images.json"))


def cached(settings, digest=DIGEST) -> Path:
    sif = Path(settings.image_cache) / "sha256" / ("%s.sif" % digest.split(":")[1])
    sif.write_bytes(b"sif")
    (sif.parent / ("%s.used" % digest.split(":")[1])).touch()
    return sif


def add_image(engine, user, sif: Path | str, digest=DIGEST, state=ImageState.READY) -> int:
    with Session(engine) as db:
        img = Image(user_id=user.id, ref="docker://localhost:5000/x/y@" + digest, digest=digest,
                    sif_path=str(sif), state=state, conversion_job_id="55" if state is ImageState.CONVERTING else None)
        db.add(img)
        db.commit()
        return img.id


def test_the_owner_deletes_an_image_and_its_unused_sif_leaves_the_cache(client, tokens, engine, users, settings):
    sif = cached(settings)
    mine = add_image(engine, users["alice"], sif)
    r = client.delete("/api/v1/images/%d" % mine, headers=bearer(tokens["bob"]))
    assert r.status_code == 404 and sif.exists()                  # not bob's: not found
    r = client.delete("/api/v1/images/%d" % mine, headers=bearer(tokens["alice"]))
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["sif_removed"] is True and r.get_json()["kept_because"] == []
    assert r.get_json()["image"]["id"] == mine and not sif.exists() and not sif.with_suffix(".used").exists()
    assert client.delete("/api/v1/images/%d" % mine, headers=bearer(tokens["alice"])).status_code == 404
    assert client.get("/api/v1/images", headers=bearer(tokens["alice"])).get_json()["images"] == []


def test_an_admin_may_delete_anyones_image(client, tokens, engine, users, settings):
    theirs = add_image(engine, users["bob"], cached(settings))
    r = client.delete("/api/v1/images/%d" % theirs, headers=bearer(tokens["root-admin"]))
    assert r.status_code == 200 and r.get_json()["sif_removed"] is True


def test_a_sif_something_else_uses_stays(client, tokens, engine, users, settings):
    """Another image of the digest, a site image, an unfinished job or a service that runs it, a
    conversion under way, or a file outside the cache: the row goes, the SIF stays, and the
    answer says why; once nothing uses it, the last delete removes it."""
    alice = bearer(tokens["alice"])
    sif = cached(settings)
    first, second = add_image(engine, users["alice"], sif), add_image(engine, users["bob"], sif)
    r = client.delete("/api/v1/images/%d" % first, headers=alice)
    assert r.get_json()["sif_removed"] is False and sif.exists()
    # bob's image is not alice's to count or name
    assert r.get_json()["kept_because"] == ["other accounts' images, jobs or services use it"]
    with Session(engine) as db:
        job = Job(user_id=users["bob"].id, name="j", state=JobState.RUNNING, image="docker://h/x@" + DIGEST,
                  script="apptainer exec %s true\n" % sif)
        svc_json = json.dumps({"image": str(sif)})
        db.add(job)
        db.add(Service(user_id=users["bob"].id, name="svc", spec_json=svc_json, service_dir="/x"))
        db.commit()
        job_id = job.id
    Path(settings.site_images_file).write_text(json.dumps({"format": "aiportal-site-images/1", "images": [
        {"name": "py", "ref": "docker://localhost:5000/site/py:1", "digest": DIGEST}]}))
    r = client.delete("/api/v1/images/%d" % second, headers=bearer(tokens["root-admin"]))
    assert r.status_code == 200 and sif.exists()
    why = r.get_json()["kept_because"]
    assert why[0] == "it is a site base image" and why[1].startswith("1 unfinished job(s) use it")
    assert why[2] == "service(s) svc run it" and len(why) == 3
    # nothing uses it any more: the last image of it takes it out of the cache
    Path(settings.site_images_file).unlink()
    with Session(engine) as db:
        db.get(Job, job_id).state = JobState.COMPLETED
        db.delete(db.exec(select(Service)).one())
        db.commit()
    last = add_image(engine, users["alice"], sif)
    r = client.delete("/api/v1/images/%d" % last, headers=alice)
    assert r.get_json()["sif_removed"] is True and not sif.exists()
    # a registered /PATH.sif is the owner's own file: never removed
    own = add_image(engine, users["alice"], TEST_SIF)
    r = client.delete("/api/v1/images/%d" % own, headers=alice)
    assert r.get_json()["sif_removed"] is False and Path(TEST_SIF).exists()
    # an image still converting keeps what its conversion writes (jobs may wait on it)
    converting = add_image(engine, users["alice"], cached(settings, "sha256:" + "cd" * 32), "sha256:" + "cd" * 32,
                           ImageState.CONVERTING)
    r = client.delete("/api/v1/images/%d" % converting, headers=alice)
    assert "its conversion job 55 is still running" in r.get_json()["kept_because"][0]


def test_the_images_page_deletes_with_csrf(client, users, engine, settings):
    sif = cached(settings)
    mine, again = add_image(engine, users["alice"], sif), add_image(engine, users["alice"], sif)
    bobs = add_image(engine, users["bob"], sif)
    assert login(client, "alice").status_code == 302
    token = csrf_of(client, "/tokens")
    page = client.get("/images").get_data(as_text=True)
    assert 'action="/images/%d/delete"' % mine in page and "return confirm(" in page
    assert 'action="/images/%d/delete"' % bobs not in page
    assert client.post("/images/%d/delete" % mine, data={}).status_code == 400          # no CSRF token
    assert client.post("/images/%d/delete" % bobs, data={"csrf": token}).status_code == 404
    r = client.post("/images/%d/delete" % mine, data={"csrf": token}, follow_redirects=True)
    assert r.status_code == 200 and "image %d deleted" % mine in r.get_data(as_text=True)
    # her own other image counted; bob's only as "other accounts'"
    assert "1 other registered image(s) use it; other accounts&#39; images, jobs or services use it" in \
        r.get_data(as_text=True) and sif.exists()
    with Session(engine) as db:
        assert sorted(i.id for i in db.exec(select(Image))) == [again, bobs]


# -- through a started portal and the CLI --------------------------------------------------------

@pytest.mark.portal
def test_a_started_portal_answers_alike_and_the_cli_deletes(tmp_path, private):
    """Real HTTP, as throwaway accounts of a portal of the test's own (on alice's and bob's Unix
    accounts): the deploy and job answers for missing and other users' images are the same, and
    `aiportal image rm` deletes by id and by reference, someone else's being not found."""
    from tests.portal.test_cli_api import call
    portal = start_test_portal(tmp_path, users=(("trust-a", "alice", False), ("trust-b", "bob", False)))
    try:
        a = portal.tokens["trust-a"]
        model = "/srv/aiportal/shared/datasets"
        for method, path, body in (
                ("POST", "/services", lambda p: {"name": "trust-x", "image": p, "model": model}),
                ("POST", "/jobs", lambda p: {"image": p, "node_type": "1card", "command": ["true"]}),
                ("POST", "/images", lambda p: {"ref": p})):
            answers = {}
            for kind, p in private.items():
                status, ans = api_call(portal, method, path, a, body(p))
                answers[kind] = (status, ans["error"], tuple(ans["errors"]), shape(ans["message"], p))
            same_answers(answers)
            assert answers["missing"][0] == 422, answers
        tok = {}
        for name in ("trust-a", "trust-b"):
            tok[name] = tmp_path / name
            tok[name].write_text(portal.tokens[name] + "\n")
        cli = lambda who, *argv: call("--url", portal.url, "--token-file", str(tok[who]), *argv)  # noqa: E731
        status, first = api_call(portal, "POST", "/images", a, {"ref": TEST_SIF})
        assert status == 201
        theirs = cli("trust-b", "image", "rm", str(first["id"]))
        missing = cli("trust-b", "image", "rm", "987654")
        assert theirs.code == missing.code == 2
        assert shape(theirs.err, str(first["id"])) == shape(missing.err, "987654")
        assert "not found, or not yours" in missing.err
        done = cli("trust-a", "image", "rm", str(first["id"]))
        assert done.code == 0 and "deleted image %d" % first["id"] in done.out
        assert "stays: it is not in the image cache" in done.out
        status, second = api_call(portal, "POST", "/images", a, {"ref": TEST_SIF})
        done = cli("trust-a", "image", "rm", TEST_SIF, "--json")
        assert done.code == 0 and json.loads(done.out)["image"]["id"] == second["id"]
        assert api_call(portal, "GET", "/images", a)[1]["images"] == []
    finally:
        portal.stop()


@pytest.mark.portal
def test_the_delete_button_asks_first_in_a_browser(tmp_path, browser):
    """Headless Chromium on a portal of the test's own (a throwaway account on alice's Unix
    account): Delete asks; dismissed, the image stays; accepted, it goes and the page says what
    became of its SIF."""
    from selenium.webdriver.common.by import By
    from tests.portal.test_browser import screenshot_dir, wait_for
    (tmp_path / "portal").mkdir()
    portal = start_test_portal(tmp_path / "portal", users=(("trust-web", "alice", False),),
                               passwords={"trust-web": "trust-web-password-1"})
    try:
        status, img = api_call(portal, "POST", "/images", portal.tokens["trust-web"], {"ref": TEST_SIF})
        assert status == 201
        d, shots = browser, screenshot_dir(tmp_path)
        d.get(portal.url + "/login")
        d.find_element(By.ID, "name").send_keys("trust-web")
        d.find_element(By.ID, "password").send_keys("trust-web-password-1")
        d.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
        wait_for("logged in", lambda: "/login" not in d.current_url, 20)
        d.get(portal.url + "/images")
        button = "delete-image-%d" % img["id"]
        d.find_element(By.ID, button).click()
        alert = d.switch_to.alert
        assert "Delete image %d?" % img["id"] in alert.text
        alert.dismiss()
        assert d.find_elements(By.ID, button)
        d.find_element(By.ID, button).click()
        d.switch_to.alert.accept()
        wait_for("the image deleted", lambda: "image %d deleted" % img["id"] in d.page_source, 20)
        d.save_screenshot(str(shots / "images-deleted.png"))
        assert not d.find_elements(By.ID, button)
        assert api_call(portal, "GET", "/images", portal.tokens["trust-web"])[1]["images"] == []
    finally:
        portal.stop()


def test_a_symlink_into_someone_elses_folder_does_not_tell_what_is_there(client, tokens, fake_backend, private,
                                                                         settings):
    """A symlink in alice's own folder that leads into a folder of bob's: the refusal is the same
    whether the file behind it exists or not (the portal resolves as root)."""
    link = Path(settings.shared_root) / "users" / "alice" / "peek"
    link.symlink_to(Path(private["closed"]).parent)
    answers = {}
    for name in ("model.sif", "none.sif"):
        path = "%s/%s" % (link, name)
        r = client.post("/api/v1/jobs", headers=bearer(tokens["alice"]),
                        json={"image": TEST_SIF, "node_type": "1card", "command": ["true"], "inputs": [path]})
        body = r.get_json()
        answers[name] = (r.status_code, body["error"], shape(body["message"], path))
    same_answers(answers)
    assert answers["none.sif"][0] == 400 and "symlink that leads out of the data roots" in answers["none.sif"][2]
    assert fake_backend.submitted == []

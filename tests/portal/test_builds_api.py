"""The builds API on the in-process app (Slurm recorded below the adapter): who sees what, the
refusals (no registry account, bad tag, hostile context tars), what the build job is."""
from __future__ import annotations

import io
import os
import pwd
import re
import tarfile
from pathlib import Path

import pytest
from sqlmodel import Session

from portal.models import ImageBuild, RegistryCredential
from tests.portal.conftest import bearer

HOST = "localhost:5000"


def _tar(*members) -> bytes:
    """members: (name, kind, data_or_linkname)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            info.linkname = value if kind in ("symlink", "hardlink") else ""
            tar.addfile(info)
    return buf.getvalue()


GOOD = _tar(("Dockerfile", "file", b"FROM localhost:5000/site/base:1\nADD ./code/ /data/code/\n"),
            ("code", "dir", ""), ("code/main.py", "file", b"print(1)\n"), ("code/link", "symlink", "main.py"))


@pytest.fixture
def with_accounts(app, engine, users):
    box = app.extensions["aiportal.secrets"]
    with Session(engine) as db:
        for name in ("alice", "bob"):
            db.add(RegistryCredential(user_id=users[name].id, host=HOST, username=name, password_sealed=box.seal("pw")))
        db.commit()


def _post(client, token, data=GOOD, tag=HOST + "/alice/app:1", **query):
    return client.post("/api/v1/images/build", data=data, content_type="application/x-tar",
                       query_string=dict(tag=tag, **query), headers=bearer(token))


def test_build_is_submitted_as_the_user(client, tokens, fake_backend, with_accounts, engine):
    r = _post(client, tokens["alice"])
    assert r.status_code == 202, r.get_json()
    b = r.get_json()
    assert b["state"] == "PENDING" and b["tag"] == HOST + "/alice/app:1" and b["slurm_job_id"]
    script, user = fake_backend.submitted[-1]
    assert user == "alice"
    assert "#SBATCH --comment=aiportal:build:%d" % b["id"] in script
    assert "image build-run --dir " in script and "#SBATCH --partition=gpu-1card" in script
    with Session(engine) as db:
        folder = Path(db.get(ImageBuild, b["id"]).build_dir)
    assert re.fullmatch(r"build-%d-[0-9a-f]{8}" % b["id"], folder.name) and folder.parent.name == "jobs"
    st = folder.stat()
    assert (st.st_uid, oct(st.st_mode & 0o777)) == (pwd.getpwnam("alice").pw_uid, "0o700")
    assert (folder / "context/code/main.py").read_text() == "print(1)\n"
    assert os.readlink(folder / "context/code/link") == "main.py"
    auth = folder / "auth.json"
    assert oct(auth.stat().st_mode & 0o777) == "0o600" and auth.stat().st_uid == st.st_uid != 0


def test_users_see_only_their_builds(client, tokens, with_accounts):
    b = _post(client, tokens["alice"]).get_json()
    assert client.get("/api/v1/images/builds/%d" % b["id"], headers=bearer(tokens["bob"])).status_code == 404
    assert client.get("/api/v1/images/builds/%d/log" % b["id"], headers=bearer(tokens["bob"])).status_code == 404
    assert client.delete("/api/v1/images/builds/%d" % b["id"], headers=bearer(tokens["bob"])).status_code == 404
    assert client.get("/api/v1/images/builds", headers=bearer(tokens["bob"])).get_json()["builds"] == []
    mine = client.get("/api/v1/images/builds", headers=bearer(tokens["alice"])).get_json()["builds"]
    assert [x["id"] for x in mine] == [b["id"]]
    every = client.get("/api/v1/images/builds", headers=bearer(tokens["root-admin"])).get_json()["builds"]
    assert [(x["id"], x["owner"]) for x in every] == [(b["id"], "alice")]


def test_cancel(client, tokens, fake_backend, with_accounts):
    b = _post(client, tokens["alice"]).get_json()
    r = client.delete("/api/v1/images/builds/%d" % b["id"], headers=bearer(tokens["alice"]))
    assert r.status_code == 202 and r.get_json()["state"] == "CANCELLED"
    assert fake_backend.cancelled == [(b["slurm_job_id"], "alice")]
    assert client.delete("/api/v1/images/builds/%d" % b["id"], headers=bearer(tokens["alice"])).status_code == 409


def test_no_registry_account(client, tokens, fake_backend):
    r = _post(client, tokens["alice"])
    assert r.status_code == 422
    assert r.get_json()["errors"]["tag"] == "add your account for localhost:5000 first: aiportal registry login localhost:5000"
    assert fake_backend.submitted == []


@pytest.mark.parametrize("tag, field", [("alice/app:1", "tag"), ("localhost:5000/Alice/x", "tag")])
def test_bad_tags(client, tokens, with_accounts, tag, field):
    r = _post(client, tokens["alice"], tag=tag)
    assert r.status_code == 422 and field in r.get_json()["errors"]


@pytest.mark.parametrize("members, why", [
    ([("/etc/cron.d/x", "file", b"x")], "absolute path"),
    ([("../../../x", "file", b"x")], "'..'"),
    ([("dev", "chr", "")], "a device"),
    ([("p", "fifo", "")], "fifo"),
    ([("l", "symlink", "/etc")], "outside the context"),
    ([("l", "symlink", "../../../../etc")], "outside the context"),
    ([("t", "symlink", "."), ("s", "symlink", "t/../x")], "resolves outside"),
    ([("l", "symlink", "sub"), ("sub", "dir", ""), ("l/x", "file", b"x")], "which is a link"),
    ([("h", "hardlink", "/etc/shadow")], "outside the context"),
])
def test_hostile_contexts_are_refused(client, tokens, fake_backend, with_accounts, settings, members, why):
    data = _tar(("Dockerfile", "file", b"FROM scratch\n"), *members)
    r = _post(client, tokens["alice"], data=data)
    assert r.status_code == 422, r.get_json()
    assert why in r.get_json()["errors"]["context"]
    assert fake_backend.submitted == []
    jobs = Path(settings.shared_root) / "users" / "alice" / "jobs"
    assert [p.name for p in jobs.iterdir()] == []           # nothing left behind


def test_context_limits(client, tokens, fake_backend, with_accounts):
    r = _post(client, tokens["alice"], data=_tar(("code/x", "file", b"x")))
    assert r.status_code == 422 and "no such Dockerfile" in r.get_json()["errors"]["context"]
    r = _post(client, tokens["alice"], data=b"not a tar at all" * 100)
    assert r.status_code == 422 and "not a tar" in r.get_json()["errors"]["context"]
    r = _post(client, tokens["alice"], dockerfile="../Dockerfile")
    assert r.status_code == 422 and "dockerfile" in r.get_json()["errors"]
    r = client.post("/api/v1/images/build", data=GOOD, content_type="application/json",
                    query_string={"tag": HOST + "/a/b:1"}, headers=bearer(tokens["alice"]))
    assert r.status_code == 422 and "application/x-tar" in r.get_json()["message"]


def test_build_page(client, with_accounts):
    from tests.portal.conftest import login
    login(client, "alice")
    assert b'href="/images/builds"' in client.get("/images").data
    page = client.get("/images/builds")
    assert page.status_code == 200 and b'id="build-form"' in page.data

"""``Idempotency-Key`` on ``POST /jobs`` and ``POST /services`` (portal/services/idempotency.py):
the first answer again for the same key, per user, for 24 hours; a different request with the
key refused; a request still in flight answered 409; a portal killed mid-request (a
BaseException raised where the process would die) answered on retry with what it stored, never
with a second job. Through the Flask test client and a recording Slurm backend; the burst with a
real kill is tests/faults/test_portal_kill.py."""
from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import subprocess
import urllib.error
import urllib.request
import uuid

import pytest
from sqlalchemy import update
from sqlmodel import Session, select

from portal.models import IdempotencyKey, Job, Service, utcnow
from portal.services import idempotency
from tests.portal.conftest import TEST_SIF, _remove_job_folders, api_call, bearer

SIF = TEST_SIF
JOB = {"image": SIF, "node_type": "1card", "command": ["python3", "-c", "print(1)"]}


class Killed(BaseException):
    """Where the portal's process would die: nothing after it runs, no answer is sent."""


def post(client, token, body=JOB, key=None, path="/api/v1/jobs"):
    headers = bearer(token)
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(path, headers=headers, json=body)


def jobs_in(engine) -> list[Job]:
    with Session(engine) as db:
        return list(db.exec(select(Job)))


def age_keys(engine, seconds: float = 3600) -> None:
    """Every unanswered key's request began ``seconds`` ago (past the in-flight time)."""
    with Session(engine) as db:
        db.exec(update(IdempotencyKey).values(claimed_at=utcnow() - dt.timedelta(seconds=seconds)))
        db.commit()


def test_the_same_key_gets_the_first_answer_and_one_job(client, tokens, fake_backend, engine):
    key = str(uuid.uuid4())
    first = post(client, tokens["alice"], key=key)
    assert first.status_code == 201, first.get_json()
    again = post(client, tokens["alice"], key=key)
    assert (again.status_code, again.get_data()) == (201, first.get_data())
    assert again.headers["Location"] == first.headers["Location"] == "/api/v1/jobs/%s" % first.get_json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert len(fake_backend.submitted) == 1 and len(jobs_in(engine)) == 1
    # the same JSON with its keys in another order and other spacing is the same request
    reordered = client.post("/api/v1/jobs", headers={**bearer(tokens["alice"]), "Idempotency-Key": key,
                                                     "Content-Type": "application/json"},
                            data=json.dumps(dict(reversed(list(JOB.items()))), indent=3))
    assert (reordered.status_code, reordered.get_data()) == (201, first.get_data())


def test_without_a_key_every_request_is_a_new_job(client, tokens, fake_backend, engine):
    assert post(client, tokens["alice"]).get_json()["id"] != post(client, tokens["alice"]).get_json()["id"]
    assert len(jobs_in(engine)) == 2


def test_keys_are_per_user(client, tokens, fake_backend, engine):
    a = post(client, tokens["alice"], key="same-key")
    b = post(client, tokens["bob"], key="same-key")
    assert a.status_code == b.status_code == 201
    assert a.get_json()["id"] != b.get_json()["id"] and b.get_json()["owner"] == "bob"
    assert "Idempotent-Replayed" not in b.headers
    assert len(fake_backend.submitted) == 2


@pytest.mark.parametrize("other", [
    {**JOB, "name": "another"},
    {**JOB, "command": ["python3", "-c", "print(2)"]},
])
def test_the_same_key_with_another_body_is_refused_naming_the_header(client, tokens, fake_backend, engine, other):
    key = str(uuid.uuid4())
    assert post(client, tokens["alice"], key=key).status_code == 201
    r = post(client, tokens["alice"], other, key=key)
    assert r.status_code == 422, r.get_json()
    body = r.get_json()
    assert body["error"] == "invalid" and "Idempotency-Key" in body["errors"]
    assert "send a new key" in body["message"] and "different request" in body["message"]
    assert len(fake_backend.submitted) == 1


def test_the_same_key_on_another_endpoint_is_another_request(client, tokens, fake_backend):
    key = str(uuid.uuid4())
    assert post(client, tokens["alice"], key=key).status_code == 201
    r = post(client, tokens["alice"], {"name": "toy", "image": SIF, "model": "/nowhere"}, key=key,
             path="/api/v1/services")
    assert r.status_code == 422 and "Idempotency-Key" in r.get_json()["errors"]


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "tab\there", "caf\u00e9"])
def test_a_malformed_key_is_refused_before_anything_is_stored(client, tokens, fake_backend, engine, key):
    r = client.post("/api/v1/jobs", headers={**bearer(tokens["alice"]), "Idempotency-Key": key.encode().decode("latin-1")},
                    json=JOB)
    assert r.status_code == 422 and "Idempotency-Key" in r.get_json()["errors"], r.get_json()
    assert "visible ASCII" in r.get_json()["message"]
    assert not fake_backend.submitted and not jobs_in(engine)


def test_a_request_refused_before_storing_keeps_no_answer(client, tokens, fake_backend, engine):
    """Invalid fields store nothing: the key is not used up, so the fixed request may take it."""
    key = str(uuid.uuid4())
    bad = post(client, tokens["alice"], {**JOB, "node_type": "9card"}, key=key)
    assert bad.status_code == 422 and "node_type" in bad.get_json()["errors"]
    with Session(engine) as db:
        assert db.exec(select(IdempotencyKey)).first() is None
    good = post(client, tokens["alice"], key=key)
    assert good.status_code == 201 and len(fake_backend.submitted) == 1


def test_a_refused_submission_is_the_keys_answer(client, tokens, fake_backend, engine):
    """sbatch refused: the job is stored FAILED and the 422 is the answer every retry gets."""
    from slurm.errors import SubmitError
    calls = []

    def refuse(script, user=None):
        calls.append(script)
        raise SubmitError(["sbatch"], 1, "", "sbatch: error: Batch job submission failed: Invalid account")
    fake_backend.submit = refuse
    key = str(uuid.uuid4())
    first = post(client, tokens["alice"], key=key)
    assert first.status_code == 422 and "Invalid account" in first.get_json()["message"]
    again = post(client, tokens["alice"], key=key)
    assert (again.status_code, again.get_data()) == (422, first.get_data())
    assert len(calls) == 1 and [j.state.value for j in jobs_in(engine)] == ["FAILED"]


def test_killed_after_storing_the_retry_gets_that_job(client, tokens, fake_backend, engine, monkeypatch):
    """The portal dies while sbatch runs (the job is stored SUBMITTING, no answer was sent): a
    retry while the first request could still be running gets 409 with Retry-After; once it is
    past the in-flight time, 201 with that job (the reconciler submits or adopts it), and the
    same answer from then on. Never a second job or a second sbatch."""
    def killed(script, user=None):
        raise Killed()
    monkeypatch.setattr(fake_backend, "submit", killed)
    key = str(uuid.uuid4())
    with pytest.raises(Killed):
        post(client, tokens["alice"], key=key)
    [stored] = jobs_in(engine)
    assert stored.state.value == "SUBMITTING"
    busy = post(client, tokens["alice"], key=key)
    assert busy.status_code == 409 and busy.get_json()["error"] == "idempotency_in_flight"
    assert busy.headers["Retry-After"] == "1" and "same key" in busy.get_json()["message"]
    age_keys(engine)
    r = post(client, tokens["alice"], key=key)
    assert r.status_code == 201 and r.get_json()["id"] == stored.id and r.get_json()["state"] == "SUBMITTING"
    assert r.headers["Location"] == "/api/v1/jobs/%s" % stored.id
    again = post(client, tokens["alice"], key=key)
    assert (again.status_code, again.get_data()) == (201, r.get_data())
    assert len(jobs_in(engine)) == 1 and not fake_backend.submitted


def test_killed_after_submitting_a_retry_gets_the_submitted_job_at_once(client, tokens, fake_backend, engine,
                                                                        monkeypatch):
    """Submitted and stored PENDING, then killed before the answer was recorded: the job is
    settled, so a retry gets it without waiting for the in-flight time."""
    real = idempotency.record

    def record_once(*a, **kw):
        monkeypatch.setattr(idempotency, "record", real)
        raise Killed()
    monkeypatch.setattr(idempotency, "record", record_once)
    key = str(uuid.uuid4())
    with pytest.raises(Killed):
        post(client, tokens["alice"], key=key)
    [stored] = jobs_in(engine)
    r = post(client, tokens["alice"], key=key)
    assert r.status_code == 201 and r.get_json()["id"] == stored.id and r.get_json()["state"] == "PENDING"
    assert r.get_json()["slurm_job_id"] == str(fake_backend.next_id) and r.headers["Idempotent-Replayed"] == "true"
    assert len(fake_backend.submitted) == 1 and len(jobs_in(engine)) == 1


def test_killed_before_storing_a_retry_runs_it_once_under_the_reserved_id(client, tokens, fake_backend, engine,
                                                                          monkeypatch):
    """Killed after the key was taken and before the job was stored: nothing was made, so once
    the first request is past the in-flight time a retry runs it, as the id the key reserved."""
    from portal.services import submit as submission
    real = submission.check

    def check_once(*a, **kw):
        monkeypatch.setattr(submission, "check", real)
        raise Killed()
    monkeypatch.setattr(submission, "check", check_once)
    key = str(uuid.uuid4())
    with pytest.raises(Killed):
        post(client, tokens["alice"], key=key)
    assert not jobs_in(engine)
    assert post(client, tokens["alice"], key=key).status_code == 409
    with Session(engine) as db:
        reserved = db.exec(select(IdempotencyKey)).one().resource_id
    age_keys(engine)
    r = post(client, tokens["alice"], key=key)
    assert r.status_code == 201 and r.get_json()["id"] == reserved
    assert "Idempotent-Replayed" not in r.headers
    assert post(client, tokens["alice"], key=key).get_data() == r.get_data()
    assert len(fake_backend.submitted) == 1 and [j.id for j in jobs_in(engine)] == [reserved]


def test_keys_expire_after_24_hours_and_are_swept(client, tokens, fake_backend, engine):
    key = str(uuid.uuid4())
    first = post(client, tokens["alice"], key=key).get_json()
    with Session(engine) as db:
        db.exec(update(IdempotencyKey).values(expires_at=utcnow() - dt.timedelta(seconds=1)))
        db.commit()
    later = post(client, tokens["alice"], key=key)
    assert later.status_code == 201 and later.get_json()["id"] != first["id"]
    with Session(engine) as db:
        rows = list(db.exec(select(IdempotencyKey)))
    assert [r.resource_id for r in rows] == [later.get_json()["id"]]
    assert rows[0].expires_at - rows[0].created_at == dt.timedelta(hours=24)


def test_services_the_same_key_gets_the_first_answer(client, tokens, fake_backend, engine, base_image, settings):
    import shutil
    from pathlib import Path
    model = Path(settings.shared_root) / "users" / "alice" / "toy"
    shutil.copytree(Path(__file__).resolve().parents[1] / "inference" / "toy_model", model)
    for p in [model, *model.iterdir()]:
        shutil.chown(p, "alice", "alice")
    body = {"name": "toy", "image": str(base_image), "model": str(model)}
    key = str(uuid.uuid4())
    first = post(client, tokens["alice"], body, key=key, path="/api/v1/services")
    assert first.status_code == 201, first.get_json()
    again = post(client, tokens["alice"], body, key=key, path="/api/v1/services")
    assert (again.status_code, again.get_data()) == (201, first.get_data())
    assert again.headers["Location"] == "/api/v1/services/toy"
    # without the key the same request is a conflict (the name is taken), as before
    assert post(client, tokens["alice"], body, path="/api/v1/services").status_code == 409
    r = post(client, tokens["alice"], {**body, "min_replicas": 2, "max_replicas": 2}, key=key, path="/api/v1/services")
    assert r.status_code == 422 and "Idempotency-Key" in r.get_json()["errors"]
    with Session(engine) as db:
        [svc] = db.exec(select(Service)).all()
        assert db.exec(select(IdempotencyKey)).one().resource_id == svc.id == first.get_json()["id"]


def test_the_header_is_in_the_openapi_document():
    import portal.api  # noqa: F401
    from portal.api.openapi import openapi_document
    doc = openapi_document()
    for path in ("/jobs", "/services"):
        [param] = [p for p in doc["paths"][path]["post"]["parameters"] if p["in"] == "header"]
        assert param["name"] == "Idempotency-Key" and param["required"] is False
        assert param["schema"]["maxLength"] == 255 and "24 h" in param["description"]
        assert "409" in doc["paths"][path]["post"]["responses"]
    assert "parameters" not in doc["paths"]["/jobs"]["get"] or all(
        p["in"] != "header" for p in doc["paths"]["/jobs"]["get"]["parameters"])


@pytest.mark.portal
@pytest.mark.slurm
def test_concurrent_requests_with_one_key_make_one_job(live_portal, base_image):
    """Eight requests with one key at once, to a portal of gunicorn workers on the real cluster:
    one job; each answer is that job (201) or 'still being processed' (409)."""
    key = str(uuid.uuid4())
    body = {"image": str(base_image), "node_type": "1card", "command": ["true"], "name": "idem-race",
            "time_limit": "1"}

    def send(_):
        req = urllib.request.Request(live_portal.url + "/api/v1/jobs", data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": "Bearer " + live_portal.tokens["alice"],
                                              "Content-Type": "application/json", "Idempotency-Key": key})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            with e:
                return e.code, json.loads(e.read())
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(8)))
    ids = {a["id"] for s, a in answers if s == 201}
    try:
        assert {s for s, _ in answers} <= {201, 409}, answers
        assert all(a["error"] == "idempotency_in_flight" for s, a in answers if s == 409)
        assert len(ids) == 1, answers
        [job_id] = ids
        with Session(live_portal.engine) as db:
            assert db.exec(select(Job).where(Job.name == "idem-race", Job.id == job_id)).one()
            assert db.exec(select(IdempotencyKey).where(IdempotencyKey.key == key)).one().resource_id == job_id
        status, again = api_call(live_portal, "POST", "/jobs", live_portal.tokens["alice"], body)
        assert status == 201 and again["id"] != job_id     # no key: a new job, as always
        ids.add(again["id"])
    finally:
        with Session(live_portal.engine) as db:
            live = [j.slurm_job_id for j in db.exec(select(Job).where(Job.id.in_(ids))) if j.slurm_job_id]
        if live:
            subprocess.run(["scancel", *live], capture_output=True, timeout=60, check=False)
        _remove_job_folders(ids)

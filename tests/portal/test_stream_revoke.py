"""A live log stream ends when the credential it was opened with no longer lets its user in:
a revoked token, a session logged out (everywhere), a disabled account. The stream asks again
every RECHECK_S (set to 0 here: every chunk) and ends with a ``denied`` event; the log's bytes
come from a stand-in for the SSH tail, so only the portal's side is tested."""
from __future__ import annotations

import itertools
import json

import pytest
from sqlmodel import Session

from portal.logs import stream as logstream
from portal.models import Job, User
from portal.services import accounts
from slurm.states import JobState
from tests.portal.conftest import bearer, login


def _fake_follow(target, path, offset, heartbeat_s=5.0, stop=None, **_):
    """A log that keeps growing one line a chunk, heartbeats between."""
    from portal.logs.tail import LogChunk
    for n in itertools.count():
        if stop is not None and stop.is_set():
            return
        if n % 2:
            yield LogChunk(offset, b"")
        else:
            data = b"line %d\n" % n
            yield LogChunk(offset, data)
            offset += len(data)


@pytest.fixture
def running_job(engine, users, settings, monkeypatch):
    monkeypatch.setattr(logstream, "follow_log", _fake_follow)
    monkeypatch.setattr(logstream, "RECHECK_S", 0.0)
    monkeypatch.setattr(logstream, "_job_over", lambda app, job_id: False)
    with Session(engine) as db:
        job = Job(user_id=users["alice"].id, name="j", state=JobState.RUNNING, slurm_job_id="4242",
                  job_dir="%s/users/alice/jobs/x" % settings.shared_root, script="true\n")
        db.add(job)
        db.commit()
        return job.id


def _events(resp, until: int = 200):
    """The SSE events of a streamed answer as (event, data), until a denied or ``until`` of them."""
    out, buf = [], b""
    for piece in resp.response:
        buf += piece if isinstance(piece, bytes) else piece.encode()
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            fields = dict(line.split(": ", 1) for line in block.decode().splitlines() if ": " in line)
            if "event" in fields:
                out.append((fields["event"], json.loads(fields["data"])))
                if fields["event"] == "denied" or len(out) >= until:
                    resp.close()
                    return out
    return out


def test_a_revoked_token_ends_its_open_stream(client, engine, users, tokens, running_job):
    resp = client.get("/api/v1/jobs/%s/log?follow=1" % running_job, headers=bearer(tokens["alice"]), buffered=False)
    assert resp.status_code == 200
    it = iter(resp.response)
    head = b""
    while head.count(b"event: log") < 2:        # the stream runs
        head += next(it)
    with Session(engine) as db:
        alice = db.get(User, users["alice"].id)
        (rec,) = [t for t in accounts.list_tokens(db, alice)]
        accounts.revoke_token(db, alice, rec.id)
        db.commit()
    rest = _events(resp)
    assert rest[-1][0] == "denied" and "no longer valid" in rest[-1][1]["message"], rest[-3:]
    # and it cannot be opened again with that token
    again = client.get("/api/v1/jobs/%s/log?follow=1" % running_job, headers=bearer(tokens["alice"]))
    assert again.status_code == 401


def test_logging_out_everywhere_ends_the_pages_stream(client, engine, users, running_job):
    login(client, "alice")
    resp = client.get("/api/v1/jobs/%s/log?follow=1" % running_job, buffered=False)
    assert resp.status_code == 200
    it = iter(resp.response)
    head = b""
    while head.count(b"event: log") < 2:
        head += next(it)
    from portal.services import web_sessions
    with Session(engine) as db:
        assert web_sessions.end_sessions(db, db.get(User, users["alice"].id)) >= 1
        db.commit()
    rest = _events(resp)
    assert rest[-1][0] == "denied", rest[-3:]


def test_a_valid_token_keeps_its_stream(client, tokens, running_job):
    resp = client.get("/api/v1/jobs/%s/log?follow=1" % running_job, headers=bearer(tokens["alice"]), buffered=False)
    events = _events(resp, until=20)
    assert len(events) == 20 and {e for e, _ in events} == {"log"}


def test_recheck_asks_at_most_every_interval():
    now = [0.0]
    answers = []

    def allowed():
        answers.append(now[0])
        return now[0] < 25
    r = logstream.Recheck(allowed, every_s=10, clock=lambda: now[0])
    seen = []
    for t in range(0, 40, 2):
        now[0] = float(t)
        seen.append(r.denied())
    assert answers == [10.0, 20.0, 30.0]
    assert seen.index(True) == 15 and seen.count(True) == 1     # denied at t=30, asked once
    assert not logstream.Recheck(None).denied()

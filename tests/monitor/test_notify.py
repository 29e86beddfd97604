"""Notifications: each event reaches the owner once (webhook with a JSON body, email over
SMTP), with retries and backoff; two notifiers never both send a row."""
import datetime as dt
import hashlib
import hmac
import threading
import time

import pytest
from sqlmodel import Session, select

from portal.models import Event, EventKind, Job, utcnow
from portal.services.notify import Notifier, backoff_s, email_of
from portal.settings import Settings
from tests.monitor.conftest import free_port


def settings(**kw):
    base = {"notify_backoff_s": 0.05, "notify_timeout_s": 5, "portal_url": "http://portal.example"}
    base.update(kw)
    return Settings.from_mapping(base, require_secrets=False)


def add_events(engine, owner, n, kind=EventKind.REQUEUED):
    with Session(engine, expire_on_commit=False) as db:
        job = Job(user_id=owner.id, name="train", slurm_job_id="4242")
        db.add(job)
        db.flush()
        evs = [Event(kind=kind, job_id=job.id, user_id=owner.id, node="g1n1", key="requeue:4242:%d" % i,
                     message="requeued: node g1n1 went down (%d)" % i, notify_after=utcnow()) for i in range(n)]
        db.add_all(evs)
        db.commit()
        return job, [e.id for e in evs]


@pytest.mark.parametrize("attempts,want", [(1, 5), (2, 10), (3, 20), (4, 40), (20, 3600)])
def test_backoff_doubles_up_to_an_hour(attempts, want):
    assert backoff_s(attempts, 5) == want


def test_webhook_gets_each_event_once_signed(db_engine, owners, receiver):
    job, ids = add_events(db_engine, owners["alice"], 3)
    n = Notifier(db_engine, settings(notify_webhook_url=receiver.url, notify_webhook_secret="s3cret"))
    assert n.deliver_due() == 3
    assert n.deliver_due() == 0
    assert sorted(b["event_id"] for b in receiver.bodies()) == ids
    headers, raw = receiver.posts[0]
    assert headers["X-Aiportal-Signature"] == "sha256=" + hmac.new(b"s3cret", raw, hashlib.sha256).hexdigest()
    body = receiver.bodies()[0]
    assert body["kind"] == "requeued" and body["user"] == {"name": "alice", "unix_user": "alice"}
    assert body["job"]["url"] == "http://portal.example/jobs/%s" % job.id and body["node"] == "g1n1"
    with Session(db_engine) as db:
        rows = db.exec(select(Event).where(Event.id.in_(ids))).all()
        assert all(r.notified_at and r.notify_attempts == 1 and r.notify_done == "webhook" for r in rows)


def test_two_notifiers_at_once_never_send_a_row_twice(db_engine, owners, receiver):
    _, ids = add_events(db_engine, owners["alice"], 40)
    s = settings(notify_webhook_url=receiver.url)
    notifiers = [Notifier(db_engine, s), Notifier(db_engine, s)]
    threads = [threading.Thread(target=lambda n=n: [n.deliver_due(limit=100) for _ in range(3)]) for n in notifiers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    got = [b["event_id"] for b in receiver.bodies()]
    assert sorted(got) == ids          # every one, none twice


def test_failures_are_retried_with_backoff_then_recorded_once(db_engine, owners, receiver):
    receiver.fail = 2
    _, (event_id,) = add_events(db_engine, owners["alice"], 1)
    n = Notifier(db_engine, settings(notify_webhook_url=receiver.url))
    assert n.deliver_due() == 0
    with Session(db_engine) as db:
        ev = db.get(Event, event_id)
        assert ev.notify_attempts == 1 and ev.notified_at is None and "500" in ev.notify_error
        assert ev.notify_after > utcnow() - dt.timedelta(seconds=1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not receiver.posts:
        n.deliver_due()
        time.sleep(0.05)
    assert [b["event_id"] for b in receiver.bodies()] == [event_id]
    with Session(db_engine) as db:
        ev = db.get(Event, event_id)
        assert ev.notify_attempts == 3 and ev.notified_at is not None and ev.notify_error == ""


def test_gives_up_after_max_attempts(db_engine, owners):
    _, (event_id,) = add_events(db_engine, owners["alice"], 1)
    dead = "http://127.0.0.1:%d/nobody" % free_port()
    n = Notifier(db_engine, settings(notify_webhook_url=dead, notify_max_attempts=2, notify_backoff_s=0.01))
    for _ in range(20):
        n.deliver_due()
        time.sleep(0.02)
    with Session(db_engine) as db:
        ev = db.get(Event, event_id)
        assert ev.notify_attempts == 2 and ev.notify_after is None and ev.notified_at is None
        assert ev.notify_error.startswith("gave up after 2 tries")


def test_email_to_the_owner_and_no_webhook_repeat_when_only_email_failed(db_engine, owners, receiver):
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Message

    got = []

    class Keep(Message):
        def handle_message(self, message):
            got.append(message)

    port = free_port()
    s = settings(notify_webhook_url=receiver.url, notify_smtp_host="127.0.0.1", notify_smtp_port=port,
                 notify_email_from="aiportal@cluster.example")
    _, (event_id,) = add_events(db_engine, owners["alice"], 1)
    n = Notifier(db_engine, s)
    assert n.deliver_due() == 0                # the SMTP server is not up yet: webhook only
    ctl = Controller(Keep(), hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not got:
            n.deliver_due()
            time.sleep(0.05)
    finally:
        ctl.stop()
    assert len(receiver.posts) == 1            # the webhook took it once, on the first try
    (msg,) = got
    assert msg["To"] == "alice@example.org" and "requeued" in msg["Subject"]
    assert msg["X-Aiportal-Event"] == str(event_id)
    with Session(db_engine) as db:
        assert db.get(Event, event_id).notify_done == "email,webhook"


def test_email_address_of_an_owner(owners):
    s = settings(notify_email_domain="cluster.example")
    assert email_of(owners["alice"], s) == "alice@example.org"
    assert email_of(owners["bob"], s) == "bob@cluster.example"
    assert email_of(owners["bob"], settings()) is None

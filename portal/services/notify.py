"""Notifications of health and recovery events: an outbox in the ``events`` table.

A row with ``notify_after`` set is due from then on. :meth:`Notifier.deliver_due` claims each
due row with one conditional UPDATE (``notify_claim`` + a lease in ``notify_claimed_until``):
of two monitor processes, or a monitor restarted mid-send, exactly one gets a row. It sends
the row to every configured channel that has not taken it yet (``notify_done``), then sets
``notified_at``; a failure is retried with exponential backoff (``notify_backoff_s``, doubling,
at most an hour) up to ``notify_max_attempts`` times, and the last error is kept in
``notify_error``.

Channels:

- webhook: ``POST notify_webhook_url`` with a JSON body (:func:`payload`); header
  ``X-Aiportal-Event`` carries the event id (a receiver can drop a repeat: a monitor killed
  after the POST and before recording it sends it again when the lease ends), and with
  ``notify_webhook_secret`` ``X-Aiportal-Signature: sha256=<HMAC of the body>``;
- email through ``notify_smtp_host`` to the owner (``users.email``, else
  ``UNIXUSER@notify_email_domain``); events without an owner address skip it.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import smtplib
import ssl
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from email.message import EmailMessage

import sqlalchemy as sa
from sqlmodel import Session

from portal.models import Event, Job, User, utcnow
from portal.settings import Settings

log = logging.getLogger(__name__)

BACKOFF_CAP_S = 3600.0


class NotifyError(Exception):
    """A channel could not deliver: names the channel, the target and why."""


def backoff_s(attempts: int, base: float, cap: float = BACKOFF_CAP_S) -> float:
    """Wait before try ``attempts + 1``: base, 2*base, 4*base, ... at most ``cap``."""
    return min(cap, base * (2 ** max(0, attempts - 1)))


def notify_wanted(settings: Settings, has_owner: bool) -> bool:
    """Whether a new event should be notified at all (some channel could take it)."""
    if has_owner:
        return bool(settings.notify_webhook_url or settings.notify_smtp_host)
    return bool(settings.notify_node_events and settings.notify_webhook_url)


def payload(event: Event, job: Job | None, user: User | None, settings: Settings) -> dict:
    """The webhook body."""
    base = settings.portal_url.rstrip("/")
    return {
        "event_id": event.id, "kind": event.kind.value, "at": event.at.isoformat(), "node": event.node,
        "message": event.message,
        "job": None if job is None else {
            "id": job.id, "name": job.name, "slurm_job_id": job.slurm_job_id,
            "state": job.state.value, "restarts": job.restarts, "url": "%s/jobs/%s" % (base, job.id)},
        "user": None if user is None else {"name": user.name, "unix_user": user.unix_user},
        "cluster": settings.cluster_name,
    }


def email_of(user: User | None, settings: Settings) -> str | None:
    if user is None:
        return None
    if user.email:
        return user.email
    if settings.notify_email_domain and user.unix_user:
        return "%s@%s" % (user.unix_user, settings.notify_email_domain)
    return None


def email_message(body: dict, to: str, sender: str) -> EmailMessage:
    msg = EmailMessage()
    what = ("job %s" % body["job"]["name"]) if body.get("job") else ("node %s" % body.get("node"))
    msg["Subject"] = "[aiportal %s] %s %s" % (body.get("cluster", ""), what, body["kind"])
    msg["From"], msg["To"] = sender, to
    msg["X-Aiportal-Event"] = str(body["event_id"])
    lines = [body["message"], ""]
    if body.get("job"):
        lines += ["Job: %s (Slurm %s), now %s" % (body["job"]["name"], body["job"]["slurm_job_id"], body["job"]["state"]),
                  body["job"]["url"]]
    if body.get("node"):
        lines.append("Node: %s" % body["node"])
    lines.append("At: %s" % body["at"])
    msg.set_content("\n".join(lines) + "\n")
    return msg


@dataclass
class Webhook:
    url: str
    secret: str
    timeout: float
    name: str = "webhook"

    def applies(self, body: dict, email: str | None) -> bool:
        return True

    def send(self, body: dict, email: str | None) -> None:
        data = json.dumps(body, sort_keys=True).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "aiportal-monitor",
                   "X-Aiportal-Event": str(body["event_id"])}
        if self.secret:
            headers["X-Aiportal-Signature"] = "sha256=" + hmac.new(self.secret.encode(), data, hashlib.sha256).hexdigest()
        req = urllib.request.Request(self.url, data=data, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                resp.read()
        except urllib.error.HTTPError as e:
            e.close()
            raise NotifyError("webhook %s answered %d %s" % (self.url, e.code, e.reason)) from e
        except (urllib.error.URLError, OSError) as e:
            raise NotifyError("webhook %s: %s" % (self.url, getattr(e, "reason", None) or e)) from e


@dataclass
class Email:
    host: str
    port: int
    user: str
    password: str
    starttls: bool
    sender: str
    timeout: float
    name: str = "email"

    def applies(self, body: dict, email: str | None) -> bool:
        return bool(email)

    def send(self, body: dict, email: str | None) -> None:
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                if self.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if self.user:
                    smtp.login(self.user, self.password)
                smtp.send_message(email_message(body, email or "", self.sender))
        except (smtplib.SMTPException, OSError) as e:
            raise NotifyError("SMTP %s:%d to %s: %s" % (self.host, self.port, email, e)) from e


def channels(settings: Settings) -> list:
    out: list = []
    if settings.notify_webhook_url:
        out.append(Webhook(settings.notify_webhook_url, settings.notify_webhook_secret, settings.notify_timeout_s))
    if settings.notify_smtp_host:
        out.append(Email(settings.notify_smtp_host, settings.notify_smtp_port, settings.notify_smtp_user,
                         settings.notify_smtp_password, settings.notify_smtp_starttls, settings.notify_email_from,
                         settings.notify_timeout_s))
    return out


class Notifier:
    def __init__(self, engine, settings: Settings, chans: list | None = None):
        self.engine, self.settings = engine, settings
        self.channels = channels(settings) if chans is None else chans
        self.lease_s = settings.notify_timeout_s * (len(self.channels) + 1) + 30

    def _due(self, now: dt.datetime):
        t = Event.__table__.c
        return sa.and_(t.notified_at.is_(None), t.notify_after.is_not(None), t.notify_after <= now,
                       sa.or_(t.notify_claimed_until.is_(None), t.notify_claimed_until < now))

    def claim(self, event_id: int, now: dt.datetime) -> str | None:
        """Take one due row; None when another notifier has it (or it is no longer due)."""
        token = str(uuid.uuid4())
        t = Event.__table__
        with self.engine.begin() as conn:
            res = conn.execute(t.update().where(t.c.id == event_id, self._due(now)).values(
                notify_claim=token, notify_claimed_until=now + dt.timedelta(seconds=self.lease_s)))
        return token if res.rowcount == 1 else None

    def deliver_due(self, limit: int = 20) -> int:
        """Send what is due (at most ``limit`` rows); returns how many were fully delivered."""
        if not self.channels:
            return 0
        now = utcnow()
        with self.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(sa.select(Event.__table__.c.id).where(self._due(now))
                                              .order_by(Event.__table__.c.id).limit(limit))]
        sent = 0
        for event_id in ids:
            token = self.claim(event_id, now)
            if token:
                sent += self._deliver(event_id, token)
        return sent

    def _deliver(self, event_id: int, token: str) -> int:
        with Session(self.engine, expire_on_commit=False) as db:
            ev = db.get(Event, event_id)
            job = db.get(Job, ev.job_id) if ev.job_id else None
            user = db.get(User, ev.user_id) if ev.user_id else None
            body = payload(ev, job, user, self.settings)
            attempts = ev.notify_attempts + 1
            done = set(filter(None, ev.notify_done.split(",")))
        email = email_of(user, self.settings)
        errors = []
        for ch in self.channels:
            if ch.name in done or not ch.applies(body, email):
                continue
            try:
                ch.send(body, email)
                done.add(ch.name)
                log.info("event %s (%s): notified by %s", event_id, body["kind"], ch.name)
            except NotifyError as e:
                errors.append(str(e))
        now = utcnow()
        values: dict = {"notify_attempts": attempts, "notify_done": ",".join(sorted(done)), "notify_claim": None,
                        "notify_claimed_until": None}
        if not errors:
            values.update(notified_at=now, notify_after=None, notify_error="")
        elif attempts >= self.settings.notify_max_attempts:
            values.update(notify_after=None,
                          notify_error=("gave up after %d tries: %s" % (attempts, "; ".join(errors)))[:500])
            log.warning("event %s: gave up notifying after %d tries: %s", event_id, attempts, "; ".join(errors))
        else:
            wait = backoff_s(attempts, self.settings.notify_backoff_s)
            values.update(notify_after=now + dt.timedelta(seconds=wait), notify_error="; ".join(errors)[:500])
            log.info("event %s: notifying failed (%s); try %d in %.0fs", event_id, "; ".join(errors), attempts + 1, wait)
        t = Event.__table__
        with self.engine.begin() as conn:
            conn.execute(t.update().where(t.c.id == event_id, t.c.notify_claim == token).values(**values))
        return 0 if errors else 1


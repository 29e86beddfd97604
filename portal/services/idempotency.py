"""Idempotent create requests: the ``Idempotency-Key`` header of ``POST /jobs`` and ``POST /services``.

A client that did not get an answer (connection refused or dropped, a timeout, a 502/503 from a
proxy) cannot know whether its request made a job; sending it again with the same key is safe.
The rules, per user (another user's identical key is another key), for 24 hours:

- the first request with a key commits a row before it does anything else; the row reserves the
  id of the job or service the request creates (:attr:`IdempotencyKey.resource_id`), so the
  request's outcome can always be found: what was stored under that id, or nothing;
- its answer (status, body, ``Location``) is recorded once a job or service was stored (a
  refused ``sbatch`` included: the stored job is ``FAILED``, and the answer says why); every
  later request with the key gets that answer again, byte for byte;
- an error before anything was stored (invalid fields, a registry that does not answer) records
  nothing: the row is removed, and a retry runs the request again;
- the same key with another request (another body or endpoint) is refused (422, field
  ``Idempotency-Key``);
- while the request runs, a retry gets 409 ``idempotency_in_flight`` with ``Retry-After``, unless
  what it stored is already settled (a job past ``SUBMITTING``: its answer is then given);
- a request that has not answered after ``idempotency_in_flight_s`` is taken to have died (the
  portal was killed): a retry answers with what it stored (a ``SUBMITTING`` job the reconciler
  submits or adopts), or, when it stored nothing, runs the request again under the reserved id
  (the id is the job's primary key, so two runs can never both store it).

Rows past their 24 hours are removed whenever a new key is claimed. Use cases over a database
session; no Flask (:mod:`portal.api.idempotency` is the views' side).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import delete, update
from sqlmodel import Session, select

from portal.errors import ConflictError, ValidationError
from portal.models import IdempotencyKey, User

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
#: how long a key's first answer is kept
KEEP = dt.timedelta(hours=24)
#: what a key may be: 1-255 visible ASCII characters (a uuid4 is the usual choice)
KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
#: the header as the OpenAPI document describes it
HEADER_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]{1,255}$"}
HEADER_DOC = ("a key of your choosing (e.g. a uuid4), new for each new request: the same key from the same "
              "user within 24 h gets the first answer again (same status and body) instead of a second "
              "job; the same key with another body is refused (422); 409 while the first request with "
              "it is still running (retry after Retry-After)")


class KeyReused(ValidationError):
    """The key was first sent with another request."""

    def __init__(self) -> None:
        super().__init__(HEADER, "this key was first sent with a different request (another body or endpoint) "
                                 "within the last 24 hours; send a new key (e.g. a fresh uuid4) for a new request, "
                                 "or the first request's exact body to get its answer again")


class KeyInFlight(ConflictError):
    """The first request with this key has not answered yet."""

    code = "idempotency_in_flight"

    def __init__(self, retry_after: int = 1) -> None:
        super().__init__("%s: the first request with this key is still being processed; send it again with the "
                         "same key in %d s to get its answer (it will not run twice)" % (HEADER, retry_after))
        self.retry_after = retry_after


@dataclass(frozen=True)
class Answer:
    """A recorded answer, as it is sent again."""

    status: int
    body: str
    location: str | None = None


@dataclass(frozen=True)
class Claim:
    """The row of a key, and what the request that holds it is to do: send ``answer`` again;
    ``run`` the request (the row is new, or taken over); or neither: the key's first request
    has not answered, and ``lapsed`` says it has not for longer than the in-flight time."""

    record: IdempotencyKey
    answer: Answer | None = None
    run: bool = False
    lapsed: bool = False


def check_key(raw: str) -> str:
    """The header's value, or ValidationError naming the header and what a key may be."""
    if not KEY_RE.match(raw):
        raise ValidationError(HEADER, "give 1 to 255 visible ASCII characters (no spaces), e.g. a fresh uuid4 "
                                      "for each new request")
    return raw


def request_sha256(method: str, path: str, body: Any) -> str:
    """What makes two requests the same: method, path and the body (a JSON value compared as
    data, so key order and spacing do not matter; anything else as bytes)."""
    if isinstance(body, (bytes, bytearray)):
        text = bytes(body)
    else:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(b"%s %s\n%s" % (method.upper().encode(), path.encode(), text)).hexdigest()


def sweep(db: Session, now: dt.datetime) -> int:
    """Remove keys past their 24 hours (not committed); how many."""
    return db.exec(delete(IdempotencyKey).where(IdempotencyKey.expires_at < now)).rowcount


def _find(db: Session, user: User, key: str) -> IdempotencyKey | None:
    return db.exec(select(IdempotencyKey).where(IdempotencyKey.user_id == user.id, IdempotencyKey.key == key)
                   .execution_options(populate_existing=True)).first()


def claim(db: Session, user: User, key: str, digest: str, now: dt.datetime, in_flight_s: float) -> Claim:
    """The key's row, committed: a new one (``run``), or the one a request with this key made
    before (its ``answer``, or that it has none yet). KeyReused when that request was another."""
    sweep(db, now)
    row = _find(db, user, key)
    if row is None:
        row = IdempotencyKey(user_id=user.id, key=key, request_sha256=digest, claimed_at=now, created_at=now,
                             expires_at=now + KEEP)
        db.add(row)
        try:
            db.commit()
            return Claim(row, run=True)
        except sa.exc.IntegrityError:
            db.rollback()           # the same key, at the same moment: that request holds it
            row = _find(db, user, key)
            if row is None:
                raise
    else:
        db.commit()                 # the sweep
    if row.request_sha256 != digest:
        raise KeyReused()
    if row.status is not None:
        return Claim(row, answer=Answer(row.status, row.answer_json or "", row.location))
    lapsed = (now - row.claimed_at).total_seconds() > in_flight_s
    return Claim(row, lapsed=lapsed)


def take_over(db: Session, row: IdempotencyKey, now: dt.datetime) -> bool:
    """Run a lapsed key's request again (its first request died before storing anything):
    compare-and-set on ``claimed_at``, so of several retries only one does; committed."""
    done = db.exec(update(IdempotencyKey).where(IdempotencyKey.id == row.id, IdempotencyKey.status.is_(None),
                                                IdempotencyKey.claimed_at == row.claimed_at)
                   .values(claimed_at=now).execution_options(synchronize_session=False))
    db.commit()
    if done.rowcount == 1:
        log.info("idempotency key %d of user %s: its request never answered; running it again as %s",
                 row.id, row.user_id, row.resource_id)
    return done.rowcount == 1


def record(db: Session, row: IdempotencyKey, answer: Answer) -> Answer:
    """Keep ``answer`` as the key's answer, unless one was recorded already (a retry that found
    the job settled); the answer kept, committed."""
    done = db.exec(update(IdempotencyKey).where(IdempotencyKey.id == row.id, IdempotencyKey.status.is_(None))
                   .values(status=answer.status, answer_json=answer.body, location=answer.location)
                   .execution_options(synchronize_session=False))
    db.commit()
    if done.rowcount == 1:
        return answer
    kept = db.exec(select(IdempotencyKey).where(IdempotencyKey.id == row.id)
                   .execution_options(populate_existing=True)).first()
    if kept is None or kept.status is None:
        return answer               # the row went (its first request failed before storing): ours stands
    return Answer(kept.status, kept.answer_json or "", kept.location)


def release(db: Session, row: IdempotencyKey) -> None:
    """Forget a key whose request stored nothing (it failed first): a retry runs it again."""
    db.exec(delete(IdempotencyKey).where(IdempotencyKey.id == row.id, IdempotencyKey.status.is_(None)))
    db.commit()

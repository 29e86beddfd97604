"""Web sessions kept on the server: the browser's cookie holds a random id, the database only
its sha256, the account, when it was opened and last seen, and the client's address and user
agent. A session ends when its row is deleted: logging out, "log out everywhere", a password
change (the account's other sessions), or a timeout (idle or absolute) noticed on its next
request. Pure use cases over a database session (committed by the caller); no Flask."""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, or_
from sqlmodel import Session, select

from portal.models import User, WebSession, utcnow

log = logging.getLogger(__name__)

#: the last-seen time is written at most this often (seconds): no write per request
TOUCH_EVERY_S = 60.0


@dataclass(frozen=True)
class SessionLimits:
    """A session ends ``idle_s`` after its last request or ``max_age_s`` after its login."""

    idle_s: float = 8 * 3600.0
    max_age_s: float = 7 * 86400.0


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def expired(rec: WebSession, now: dt.datetime, limits: SessionLimits) -> bool:
    """Whether ``rec`` has passed its idle or absolute timeout at ``now``."""
    return ((now - rec.last_seen_at).total_seconds() >= limits.idle_s
            or (now - rec.created_at).total_seconds() >= limits.max_age_s)


def open_session(db: Session, user: User, address: str, user_agent: str,
                 limits: SessionLimits = SessionLimits()) -> str:
    """A new session for ``user``: returns its random id (for the cookie; never stored). Expired
    sessions of every account are removed on the way."""
    now = utcnow()
    db.exec(delete(WebSession).where(or_(
        WebSession.last_seen_at <= now - dt.timedelta(seconds=limits.idle_s),
        WebSession.created_at <= now - dt.timedelta(seconds=limits.max_age_s))))
    session_id = secrets.token_urlsafe(32)
    db.add(WebSession(id_sha256=_digest(session_id), user_id=user.id, created_at=now, last_seen_at=now,
                      address=(address or "")[:64], user_agent=(user_agent or "")[:128]))
    db.flush()
    log.info("web session opened for user %s from %s", user.name, address)
    return session_id


def session_record(db: Session, session_id: str) -> WebSession | None:
    if not session_id:
        return None
    return db.exec(select(WebSession).where(WebSession.id_sha256 == _digest(session_id))).first()


def user_for_session(db: Session, session_id: str, limits: SessionLimits = SessionLimits()) -> User | None:
    """The account of a live session (None: unknown, ended, timed out, or a disabled account).
    A timed-out session is deleted; the last-seen time is written at most once a minute."""
    rec = session_record(db, session_id)
    if rec is None:
        return None
    now = utcnow()
    if expired(rec, now, limits):
        db.delete(rec)
        return None
    user = db.get(User, rec.user_id)
    if user is None or user.disabled:
        return None
    if (now - rec.last_seen_at).total_seconds() >= TOUCH_EVERY_S:
        rec.last_seen_at = now
        db.add(rec)
    return user


def end_session(db: Session, session_id: str) -> None:
    """Log out: the session with this id ends (nothing happens if there is none)."""
    if session_id:
        db.exec(delete(WebSession).where(WebSession.id_sha256 == _digest(session_id)))


def end_sessions(db: Session, user: User, keep: str | None = None) -> int:
    """End every session of ``user`` but the one with id ``keep``; returns how many ended."""
    q = delete(WebSession).where(WebSession.user_id == user.id)
    if keep:
        q = q.where(WebSession.id_sha256 != _digest(keep))
    n = db.exec(q).rowcount
    log.info("%d web sessions of user %s ended%s", n, user.name, " (kept the current one)" if keep else "")
    return n


def list_sessions(db: Session, user: User, limits: SessionLimits = SessionLimits()) -> list[WebSession]:
    """The live sessions of ``user``, the most recently seen first."""
    now = utcnow()
    return [s for s in db.exec(select(WebSession).where(WebSession.user_id == user.id)
                               .order_by(WebSession.last_seen_at.desc(), WebSession.id.desc()))
            if not expired(s, now, limits)]

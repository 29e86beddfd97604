"""Accounts: users (each maps to the Unix account its jobs run as), projects, passwords,
API tokens and the rate limits of logins and of wrong API tokens. Pure use cases over a
database session; no Flask."""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import pwd
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, func
from sqlmodel import Session, select
from werkzeug.security import check_password_hash, generate_password_hash

from portal.errors import AuthError, ConflictError, NotFoundError, RateLimitError, ValidationError
from portal.models.accounts import ProjectCreate
from portal.models import ApiToken, LoginFailure, Project, ProjectMember, Service, ServiceState, User, utcnow
from portal import scopes as scopemod
from portal.scopes import FULL, Grant
from portal.services import web_sessions

_NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_UNIX_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
TOKEN_PREFIX = "aip_"
# A dummy hash, checked when the account does not exist, so both cases take the same time.
_DUMMY_HASH = generate_password_hash("not-a-password")


@dataclass(frozen=True)
class LoginLimits:
    """At most ``per_name`` failed logins per account and ``per_address`` per client address
    within ``window_s``; then logins are refused (429) until the window has passed."""

    per_name: int = 5
    per_address: int = 20
    window_s: int = 300


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name or ""):
        raise ValidationError("name", "user names are 1-64 lower-case letters, digits, '_', '.', '-', "
                                      "starting with a letter; got %r" % (name,))
    return name


def check_unix_user(unix_user: str, must_exist: bool = True) -> str:
    if not _UNIX_RE.match(unix_user or ""):
        raise ValidationError("unix_user", "%r is not a Unix user name" % (unix_user,))
    if unix_user == "root":
        raise ValidationError("unix_user", "jobs never run as root; map the user to their own Unix account")
    if must_exist:
        try:
            pwd.getpwnam(unix_user)
        except KeyError:
            raise ValidationError("unix_user", "Unix user %r does not exist on this host; create it on the "
                                               "cluster (Ansible: aiportal_unix_users) first" % unix_user) from None
    return unix_user


def check_password(password: str) -> str:
    if len(password or "") < 10:
        raise ValidationError("password", "use at least 10 characters")
    return password


def check_email(email: str | None) -> str | None:
    """An address for notifications (one line, one @), or None."""
    if email is None or email == "":
        return None
    if len(email) > 254 or email.count("@") != 1 or any(c.isspace() for c in email) or \
            not all(email.split("@")) or "." not in email.split("@")[1]:
        raise ValidationError("email", "%r is not an email address like alice@example.org" % email)
    return email


def add_user(db: Session, name: str, unix_user: str, password: str | None = None, admin: bool = False,
             check_unix: bool = True, email: str | None = None) -> User:
    """A new portal user mapped to ``unix_user``. Raises ConflictError when the name is taken."""
    _check_name(name)
    check_unix_user(unix_user, must_exist=check_unix)
    if db.exec(select(User).where(User.name == name)).first() is not None:
        raise ConflictError("user %r already exists" % name)
    user = User(name=name, unix_user=unix_user, is_admin=admin, email=check_email(email),
                password_hash=generate_password_hash(check_password(password)) if password else None)
    db.add(user)
    db.flush()
    return user


def set_password(db: Session, user: User, password: str, keep_session: str | None = None) -> None:
    """A new password for ``user``; every web session of the account ends but ``keep_session``
    (the id of the session that changed it, if any)."""
    user.password_hash = generate_password_hash(check_password(password))
    db.add(user)
    web_sessions.end_sessions(db, user, keep=keep_session)


def change_password(db: Session, user: User, current: str, new: str, keep_session: str | None = None) -> None:
    """The user's own change: ``current`` must be the password now; the account's other web
    sessions end (``keep_session``, the one that asked, stays)."""
    if not user.password_hash:
        raise ValidationError("current_password", "this account has no password (it logs in with the site's "
                                                  "admin token); an admin sets one with `aiportal user passwd`")
    if not check_password_hash(user.password_hash, current or ""):
        raise ValidationError("current_password", "that is not your current password")
    set_password(db, user, new, keep_session=keep_session)


def get_user(db: Session, name: str) -> User:
    user = db.exec(select(User).where(User.name == name)).first()
    if user is None:
        raise NotFoundError("user %r does not exist (`aiportal user add %s --unix-user UNIX_USER`)" % (name, name))
    return user


def list_users(db: Session) -> list[User]:
    return list(db.exec(select(User).order_by(User.name)))


def _failures(db: Session, key: str, since: dt.datetime) -> int:
    return db.exec(select(func.count()).select_from(LoginFailure)
                   .where(LoginFailure.key == key, LoginFailure.at >= since)).one()


def authenticate(db: Session, name: str, password: str, address: str,
                 limits: LoginLimits = LoginLimits(), bootstrap_sha256: str = "") -> User:
    """The user for a name and password, or AuthError; RateLimitError after too many failures.
    Failures are recorded (committed by the caller's session scope). The ``admin`` account's
    password is the site's bootstrap admin token (``bootstrap_sha256``: its sha256)."""
    now = utcnow()
    since = now - dt.timedelta(seconds=limits.window_s)
    name_key, addr_key = "name:%s" % name[:100], "addr:%s" % address[:100]
    if (_failures(db, name_key, since) >= limits.per_name
            or _failures(db, addr_key, since) >= limits.per_address):
        raise RateLimitError("too many failed logins; try again in %d minutes" % max(1, limits.window_s // 60),
                             retry_after=limits.window_s)
    if name == "admin" and bootstrap_sha256 and password:
        if hmac.compare_digest(token_hash(password), bootstrap_sha256):
            db.exec(delete(LoginFailure).where(LoginFailure.key == name_key))
            return ensure_admin(db)
    user = db.exec(select(User).where(User.name == name)).first()
    ok = check_password_hash(user.password_hash if user and user.password_hash else _DUMMY_HASH, password or "")
    if not ok or user is None or user.disabled or not user.password_hash:
        db.add(LoginFailure(key=name_key, at=now))
        db.add(LoginFailure(key=addr_key, at=now))
        db.exec(delete(LoginFailure).where(LoginFailure.at < since, LoginFailure.key.notlike("token:%")))
        raise AuthError("wrong user name or password")
    db.exec(delete(LoginFailure).where(LoginFailure.key == name_key))
    return user


@dataclass(frozen=True)
class TokenLimits:
    """At most ``per_address`` wrong API tokens per client address within ``window_s``; then
    each further wrong token from that address is refused with 429 until the window has passed.
    A right token always passes (the callers check the limit only for a token that failed):
    every local account shares 127.0.0.1 behind nginx. Other addresses are not affected."""

    per_address: int = 20
    window_s: int = 300


def check_token_limit(db: Session, address: str, limits: TokenLimits = TokenLimits()) -> None:
    """RateLimitError when ``address`` sent too many wrong tokens within the window."""
    since = utcnow() - dt.timedelta(seconds=limits.window_s)
    if _failures(db, "token:%s" % address[:100], since) >= limits.per_address:
        raise RateLimitError("too many wrong API tokens from %s; try again in %d minutes with a valid token "
                             "(`aiportal token create` or the Tokens page)" % (address[:100],
                                                                               max(1, limits.window_s // 60)),
                             retry_after=limits.window_s)


def record_token_failure(db: Session, address: str, limits: TokenLimits = TokenLimits()) -> None:
    """Count one wrong token from ``address`` (committed by the caller)."""
    now = utcnow()
    db.add(LoginFailure(key="token:%s" % address[:100], at=now))
    db.exec(delete(LoginFailure).where(LoginFailure.key.startswith("token:"),
                                       LoginFailure.at < now - dt.timedelta(seconds=limits.window_s)))


def wrong_token(db: Session, address: str, limits: TokenLimits = TokenLimits()) -> None:
    """A wrong token from ``address``: RateLimitError when the address is over its limit already,
    else counted (committed by the caller). The API and the router both call it."""
    check_token_limit(db, address, limits)
    record_token_failure(db, address, limits)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(db: Session, user: User, name: str = "", expires_days: int | None = None,
                 scopes: list[str] | None = None, service: str | None = None) -> tuple[str, ApiToken]:
    """A new API token for ``user``: returns the clear token (shown once) and its record.
    ``scopes`` (:mod:`portal.scopes`; None: the account's full access); ``service``: the name
    of one of the user's services it is bound to (an invoke key: scopes default to
    ``services:invoke``)."""
    if expires_days is not None and not 1 <= expires_days <= 3650:
        raise ValidationError("expires_days", "between 1 and 3650 days")
    chosen = scopemod.parse(scopes) if scopes is not None else None
    service_id = None
    if service is not None:
        svc = db.exec(select(Service).where(Service.name == service)).first()
        if svc is None or (svc.user_id != user.id and not user.is_admin):
            raise ValidationError("service", "no service named %r of yours; your services: `aiportal service list`"
                                  % service)
        if svc.state is ServiceState.DELETING:
            raise ValidationError("service", "service %r is being deleted" % service)
        service_id = svc.id
        chosen = chosen or ("services:invoke",)
        if chosen != ("services:invoke",):
            raise ValidationError("scopes", "a token bound to a service (an invoke key) may only call it: its "
                                  "scopes are services:invoke alone; make a token without --service for the rest")
    if chosen is not None and "admin" in chosen and not user.is_admin:
        raise ValidationError("scopes", "admin is for an admin account's tokens")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    rec = ApiToken(user_id=user.id, name=name[:64], token_sha256=token_hash(token), prefix=token[:12],
                   expires_at=utcnow() + dt.timedelta(days=expires_days) if expires_days else None,
                   scopes=" ".join(chosen) if chosen else "", service_id=service_id)
    db.add(rec)
    db.flush()
    return token, rec


def user_for_token(db: Session, token: str, bootstrap_sha256: str = "") -> User | None:
    """The user an API token belongs to (None: unknown, revoked, expired, or a disabled user).
    The site's bootstrap admin token (its sha256 from settings) stands for the ``admin`` user.
    What the token may do: :func:`caller_for_token`."""
    found = caller_for_token(db, token, bootstrap_sha256)
    return found[0] if found else None


def caller_for_token(db: Session, token: str, bootstrap_sha256: str = "") -> tuple[User, Grant] | None:
    """The user an API token belongs to and what it may do (:class:`portal.scopes.Grant`);
    None: unknown, revoked, expired, or a disabled user."""
    if not token:
        return None
    digest = token_hash(token)
    row = db.exec(select(ApiToken, User).join(User, User.id == ApiToken.user_id)
                  .where(ApiToken.token_sha256 == digest)).first()
    if row is not None:
        rec, user = row
        now = utcnow()
        if rec.revoked_at is not None or (rec.expires_at is not None and rec.expires_at <= now):
            return None
        if user.disabled:
            return None
        if rec.last_used_at is None or (now - rec.last_used_at).total_seconds() > 60:
            rec.last_used_at = now      # at most one write a minute per token
            db.add(rec)
        return user, Grant.of(rec.scopes, rec.service_id)
    if bootstrap_sha256 and hmac.compare_digest(digest, bootstrap_sha256):
        return ensure_admin(db), FULL
    return None


def ensure_admin(db: Session) -> User:
    """The built-in ``admin`` account (no Unix user: admins manage, they do not run jobs as it)."""
    user = db.exec(select(User).where(User.name == "admin")).first()
    if user is None:
        user = User(name="admin", unix_user="", is_admin=True)
        db.add(user)
        db.flush()
    return user


def list_tokens(db: Session, user: User) -> list[ApiToken]:
    return list(db.exec(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.created_at.desc())))


def revoke_token(db: Session, user: User, token_id: int) -> None:
    rec = db.get(ApiToken, token_id)
    if rec is None or (rec.user_id != user.id and not user.is_admin):
        raise NotFoundError("token %s does not exist" % token_id)
    rec.revoked_at = utcnow()
    db.add(rec)


def add_project(db: Session, create: ProjectCreate) -> Project:
    _check_name(create.name)
    if db.exec(select(Project).where(Project.name == create.name)).first() is not None:
        raise ConflictError("project %r already exists" % create.name)
    project = Project(name=create.name, description=create.description, slurm_account=create.slurm_account)
    db.add(project)
    db.flush()
    return project


def add_member(db: Session, project: Project, user: User) -> None:
    if db.get(ProjectMember, (project.id, user.id)) is None:
        db.add(ProjectMember(project_id=project.id, user_id=user.id))


def projects_of(db: Session, user: User) -> list[Project]:
    q = select(Project).order_by(Project.name)
    if not user.is_admin:
        q = q.join(ProjectMember, ProjectMember.project_id == Project.id).where(ProjectMember.user_id == user.id)
    return list(db.exec(q))


def owner_names(db: Session, rows) -> dict[int, str]:
    """The account names of the rows' owners (``row.user_id``), in one query."""
    ids = {r.user_id for r in rows}
    if not ids:
        return {}
    return dict(db.exec(select(User.id, User.name).where(User.id.in_(ids))).all())


def owner_of(db: Session, row) -> User:
    """The account that owns ``row`` (a job, a service, ...)."""
    return db.get(User, row.user_id)

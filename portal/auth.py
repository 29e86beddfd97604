"""Authentication and the request's user.

- Web: a login form (user name and password, rate-limited) opens a server-side session
  (:mod:`portal.services.web_sessions`): the signed cookie holds its random id and the CSRF
  token, the database only the id's hash. Logging out, "log out everywhere", a password change
  and the idle and absolute timeouts delete the row, so a saved cookie no longer works. Every
  form carries the CSRF token.
- API: ``Authorization: Bearer TOKEN`` (a user's API token, stored hashed; or the site's
  bootstrap admin token, which stands for the ``admin`` account); wrong tokens are rate-limited
  per client address. The web pages' own calls may use the session instead; unsafe methods then
  need the ``X-CSRF-Token`` header.

Every view is behind :func:`login_required` (pages) or :func:`api_auth` (API); ``g.user`` is
the :class:`portal.models.User` for the request.
"""
from __future__ import annotations

import functools
import hmac
import secrets

from flask import (Blueprint, abort, current_app, flash, g, jsonify, redirect, render_template, request, session,
                   url_for)

from portal.db_session import db
from portal.errors import AuthError, RateLimitError
from portal.models import User
from portal.scopes import FULL, Grant
from portal.services import accounts, web_sessions

bp = Blueprint("auth", __name__)


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def check_csrf() -> None:
    sent = request.form.get("csrf", "") or request.headers.get("X-CSRF-Token", "")
    if not sent or not hmac.compare_digest(sent, session.get("csrf", "")):
        abort(400, "missing or wrong CSRF token: reload the page and try again")


def session_limits() -> web_sessions.SessionLimits:
    settings = current_app.extensions["aiportal.settings"]
    return web_sessions.SessionLimits(idle_s=settings.session_idle_s, max_age_s=settings.session_max_age_s)


def current_session_id() -> str | None:
    """The id of the web session this request came with, once :func:`_session_user` accepted it."""
    return g.get("session_id")


def _session_user() -> User | None:
    sid = session.get("sid")
    if not sid:
        if session.get("uid") is not None:
            session.clear()     # a cookie of before server-side sessions: log in again
        return None
    db_ = db()
    user = web_sessions.user_for_session(db_, sid, session_limits())
    if db_.dirty or db_.deleted:
        db_.commit()        # last seen (at most once a minute), or a timed-out session removed
    if user is None:
        session.clear()
        return None
    g.session_id = sid
    g.credential = ("session", sid)
    return user


def _bearer_user() -> User | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    settings = current_app.extensions["aiportal.settings"]
    limits = accounts.TokenLimits(per_address=settings.token_failures_per_address,
                                  window_s=settings.token_failure_window_s)
    address = request.remote_addr or "unknown"
    session_ = db()
    found = accounts.caller_for_token(session_, token.strip(), settings.admin_token_sha256)
    if found is None:
        # a right token always passes: every local account reaches the portal from the same address
        # (127.0.0.1 behind nginx), and 20 wrong tokens must not lock everyone out; wrong ones over
        # the limit get 429 (guessing a 256-bit token is hopeless anyway: this is defence in depth)
        accounts.wrong_token(session_, address, limits)
        session_.commit()      # the failure counts towards the limit
        return None
    if session_.new or session_.dirty:
        session_.commit()      # last_used_at (at most once a minute), or the admin account on first use
    user, g.grant = found
    g.credential = ("token", token.strip())
    return user


def credential_check(app):
    """A check that the credential this request came with (its API token or web session) still
    lets its user in: long answers (log streams) ask it again now and then, so revoking a token,
    logging out (everywhere), a password change, a timeout or a disabled account ends them too."""
    from sqlmodel import Session
    kind, secret = g.credential
    settings = app.extensions["aiportal.settings"]
    limits = web_sessions.SessionLimits(idle_s=settings.session_idle_s, max_age_s=settings.session_max_age_s)

    def still_valid() -> bool:
        # a session of its own, never committed: the check writes nothing (last seen, last used)
        with Session(app.extensions["aiportal.engine"]) as s:
            if kind == "token":
                return accounts.caller_for_token(s, secret, settings.admin_token_sha256) is not None
            return web_sessions.user_for_session(s, secret, limits) is not None
    return still_valid


def login_required(view):
    """Web pages: a logged-in session, else the login form (and back here after)."""
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        user = _session_user()
        if user is None:
            return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
        g.user = user
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            check_csrf()
        return view(*args, **kwargs)
    return wrapped


def unauthorized(message: str):
    resp = jsonify(error="unauthorized", message=message)
    resp.status_code = 401
    resp.headers["WWW-Authenticate"] = 'Bearer realm="aiportal"'
    return resp


def insufficient_scope(scope: str | None, grant: Grant):
    """403 for a token whose scopes do not allow the operation (RFC 6750's ``insufficient_scope``)."""
    has = " ".join(grant.scopes) if grant.scopes is not None else "the account's full access"
    if scope is None:
        message = ("this operation needs a token with the account's full access (made without --scope); this token "
                   "has: %s" % has)
    else:
        message = ("this operation needs the scope %s; this token has: %s. Make a token that has it: "
                   "`aiportal token create --scope %s`" % (scope, has, scope))
    resp = jsonify(error="insufficient_scope", message=message)
    resp.status_code = 403
    resp.headers["WWW-Authenticate"] = 'Bearer realm="aiportal", error="insufficient_scope"%s' % (
        ', scope="%s"' % scope if scope else "")
    return resp


def api_auth(view, scope: str | None = None):
    """API: a Bearer token, or the browser's session plus ``X-CSRF-Token`` for unsafe methods.
    ``scope``: what the operation needs of a token (:func:`portal.scopes.needed`: "" any valid
    token, None the account's full access); a session has full access."""
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        g.grant = FULL
        user = _bearer_user()
        if user is None and not request.headers.get("Authorization"):
            g.grant = FULL
            user = _session_user()
            if user is not None and request.method not in ("GET", "HEAD", "OPTIONS"):
                sent = request.headers.get("X-CSRF-Token", "")
                if not sent or not hmac.compare_digest(sent, session.get("csrf", "")):
                    return jsonify(error="csrf", message="send the page's CSRF token in X-CSRF-Token"), 400
        if user is None:
            return unauthorized("send 'Authorization: Bearer TOKEN' (create one with `aiportal token create` "
                                "or on the Tokens page)")
        if not g.grant.allows(scope):
            return insufficient_scope(scope, g.grant)
        g.user = user
        return view(*args, **kwargs)
    return wrapped


def admin_required(user: User) -> None:
    if not user.is_admin:
        abort(403, "only admins may do this")


@bp.app_context_processor
def inject_globals():
    return {"csrf_token": csrf_token, "current_user": getattr(g, "user", None)}


def _safe_next(nxt: str | None) -> str:
    return nxt if nxt and nxt.startswith("/") and not nxt.startswith("//") and "\\" not in nxt else "/"


@bp.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "POST":
        check_csrf()
        name = request.form.get("name", "").strip()
        try:
            user = accounts.authenticate(db(), name, request.form.get("password", ""),
                                         request.remote_addr or "unknown",
                                         bootstrap_sha256=current_app.extensions["aiportal.settings"].admin_token_sha256)
        except RateLimitError as e:
            db().commit()
            flash(str(e))
            return render_template("login.html", name=name), 429, {"Retry-After": str(e.retry_after)}
        except AuthError as e:
            db().commit()      # the failure counts towards the limit
            flash(str(e))
            return render_template("login.html", name=name), 401
        session.clear()
        session["sid"] = web_sessions.open_session(db(), user, request.remote_addr or "unknown",
                                                   request.user_agent.string, session_limits())
        db().commit()
        csrf_token()
        return redirect(_safe_next(request.args.get("next")))
    return render_template("login.html")


@bp.post("/logout")
def logout():
    check_csrf()
    web_sessions.end_session(db(), session.get("sid", ""))
    db().commit()
    session.clear()
    return redirect(url_for("auth.login"))

"""Authentication and the request's user.

- Web: a login form (user name and password, rate-limited) sets a session; every form carries
  a CSRF token.
- API: ``Authorization: Bearer TOKEN`` (a user's API token, stored hashed; or the site's
  bootstrap admin token, which stands for the ``admin`` account). The web pages' own calls may
  use the session instead; unsafe methods then need the ``X-CSRF-Token`` header.

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
from portal.services import accounts

bp = Blueprint("auth", __name__)


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def check_csrf() -> None:
    sent = request.form.get("csrf", "") or request.headers.get("X-CSRF-Token", "")
    if not sent or not hmac.compare_digest(sent, session.get("csrf", "")):
        abort(400, "missing or wrong CSRF token: reload the page and try again")


def _session_user() -> User | None:
    uid = session.get("uid")
    if uid is None:
        return None
    user = db().get(User, uid)
    if user is None or user.disabled or session.get("pw") != _pw_mark(user):
        session.clear()
        return None
    return user


def _pw_mark(user: User) -> str:
    """Ties a session to the password it was opened with: changing the password ends it."""
    return (user.password_hash or "")[-12:]


def _bearer_user() -> User | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    settings = current_app.extensions["aiportal.settings"]
    session_ = db()
    user = accounts.user_for_token(session_, token.strip(), settings.admin_token_sha256)
    if session_.new or session_.dirty:
        session_.commit()      # last_used_at (at most once a minute), or the admin account on first use
    return user


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


def api_auth(view):
    """API: a Bearer token, or the browser's session plus ``X-CSRF-Token`` for unsafe methods."""
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        user = _bearer_user()
        if user is None and not request.headers.get("Authorization"):
            user = _session_user()
            if user is not None and request.method not in ("GET", "HEAD", "OPTIONS"):
                sent = request.headers.get("X-CSRF-Token", "")
                if not sent or not hmac.compare_digest(sent, session.get("csrf", "")):
                    return jsonify(error="csrf", message="send the page's CSRF token in X-CSRF-Token"), 400
        if user is None:
            return unauthorized("send 'Authorization: Bearer TOKEN' (create one with `aiportal token create` "
                                "or on the Tokens page)")
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
        db().commit()
        session.clear()
        session["uid"], session["pw"] = user.id, _pw_mark(user)
        csrf_token()
        return redirect(_safe_next(request.args.get("next")))
    return render_template("login.html")


@bp.post("/logout")
def logout():
    check_csrf()
    session.clear()
    return redirect(url_for("auth.login"))

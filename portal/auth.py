"""Authentication: the bootstrap admin token (API: ``Authorization: Bearer``; web: a login form
that sets a session). Tokens are compared by their sha256 in constant time; the clear token is
never stored by the portal. Accounts and per-user tokens build on this (see issues)."""
from __future__ import annotations

import functools
import hashlib
import hmac
import secrets

from flask import Blueprint, abort, current_app, flash, jsonify, redirect, render_template, request, session, url_for

bp = Blueprint("auth", __name__)


def token_ok(token: str) -> bool:
    want = current_app.extensions["aiportal.settings"].admin_token_sha256
    got = hashlib.sha256(token.encode()).hexdigest()
    return bool(token) and hmac.compare_digest(got, want)


def csrf_token() -> str:
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def check_csrf() -> None:
    sent = request.form.get("csrf", "")
    if not sent or not hmac.compare_digest(sent, session.get("csrf", "")):
        abort(400, "missing or wrong CSRF token: reload the page and try again")


def login_required(view):
    """Web pages: a logged-in session, else redirect to the login form."""
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        if not session.get("user"):
            return redirect(url_for("auth.login", next=request.path))
        return view(*args, **kwargs)
    return wrapped


def token_required(view):
    """API: ``Authorization: Bearer TOKEN`` (or a logged-in session, for the web pages' own calls)."""
    @functools.wraps(view)
    def wrapped(*args, **kwargs):
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token_ok(token.strip()):
            return view(*args, **kwargs)
        if session.get("user"):
            return view(*args, **kwargs)
        resp = jsonify(error="unauthorized",
                       message="send 'Authorization: Bearer TOKEN' (admin token: /etc/aiportal/secrets/admin_token)")
        resp.status_code = 401
        resp.headers["WWW-Authenticate"] = 'Bearer realm="aiportal"'
        return resp
    return wrapped


@bp.app_context_processor
def inject_csrf():
    return {"csrf_token": csrf_token}


@bp.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "POST":
        check_csrf()
        if token_ok(request.form.get("token", "").strip()):
            session.clear()
            session["user"] = "admin"
            nxt = request.args.get("next", "/")
            return redirect(nxt if nxt.startswith("/") and not nxt.startswith("//") else "/")
        flash("That token is not valid.")
        return render_template("login.html"), 401
    return render_template("login.html")


@bp.post("/logout")
def logout():
    check_csrf()
    session.clear()
    return redirect(url_for("auth.login"))

"""The account page (``/tokens``): API tokens, the logged-in browsers ("log out everywhere")
and the password."""
from __future__ import annotations

from flask import flash, g, redirect, render_template, request, session, url_for

from portal.auth import current_session_id, login_required, session_limits
from portal.db_session import db
from portal.errors import ValidationError
from portal.services import accounts, web_sessions
from portal.web.common import bp


# -- API tokens --------------------------------------------------------------------------------

@bp.route("/tokens", methods=["GET", "POST"])
@login_required
def tokens_page():
    """Create a token (shown once, in the answer to the POST), list and revoke."""
    new_token = None
    errors: dict[str, str] = {}
    name = ""
    if request.method == "POST":
        name = request.form.get("name", "").strip()[:64]
        raw = request.form.get("expires_days", "").strip()
        try:
            if raw and not raw.isdigit():
                raise ValidationError("expires_days", "a whole number of days, or empty for no expiry")
            new_token, _ = accounts.create_token(db(), g.user, name, int(raw) if raw else None)
            db().commit()
            name = ""
        except ValidationError as e:
            errors = dict(e.errors)
    return _page(new_token=new_token, name=name, errors=errors)


def _page(new_token=None, name="", errors=None, password_errors=None):
    errors, password_errors = errors or {}, password_errors or {}
    current = web_sessions.session_record(db(), current_session_id() or "")
    body = render_template("tokens.html", tokens=accounts.list_tokens(db(), g.user), new_token=new_token,
                           name=name, errors=errors, password_errors=password_errors,
                           sessions=web_sessions.list_sessions(db(), g.user, session_limits()),
                           current_session=current.id if current else None)
    return body, 422 if errors or password_errors else 200, {"Cache-Control": "no-store"}


@bp.post("/tokens/<int:token_id>/revoke")
@login_required
def token_revoke(token_id: int):
    accounts.revoke_token(db(), g.user, token_id)
    db().commit()
    flash("token revoked", "info")
    return redirect(url_for("web.tokens_page"))


# -- web sessions and the password -------------------------------------------------------------

@bp.post("/account/sessions/revoke")
@login_required
def sessions_revoke():
    """Log out everywhere: every web session of the account ends, this one too."""
    web_sessions.end_sessions(db(), g.user)
    db().commit()
    session.clear()
    flash("logged out everywhere: every browser of your account must log in again (API tokens still work)", "info")
    return redirect(url_for("auth.login"))


@bp.post("/account/password")
@login_required
def password_change():
    """A new password; the account's other web sessions end, this one stays."""
    new = request.form.get("new_password", "")
    try:
        if new != request.form.get("new_password2", ""):
            raise ValidationError("new_password2", "the two new passwords differ")
        try:
            accounts.change_password(db(), g.user, request.form.get("current_password", ""), new,
                                     keep_session=current_session_id())
        except ValidationError as e:
            if e.field == "password":
                raise ValidationError("new_password", e.detail) from e
            raise
    except ValidationError as e:
        return _page(password_errors=dict(e.errors))
    db().commit()
    flash("password changed; your other browsers are logged out", "info")
    return redirect(url_for("web.tokens_page"))

"""The API tokens pages."""
from __future__ import annotations

from flask import flash, g, redirect, render_template, request, url_for

from portal.auth import login_required
from portal.db_session import db
from portal.errors import ValidationError
from portal.services import accounts
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
    body = render_template("tokens.html", tokens=accounts.list_tokens(db(), g.user), new_token=new_token,
                           name=name, errors=errors)
    return body, 422 if errors else 200, {"Cache-Control": "no-store"}


@bp.post("/tokens/<int:token_id>/revoke")
@login_required
def token_revoke(token_id: int):
    accounts.revoke_token(db(), g.user, token_id)
    db().commit()
    flash("token revoked", "info")
    return redirect(url_for("web.tokens_page"))

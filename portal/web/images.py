"""The images pages."""
from __future__ import annotations

from flask import flash, g, jsonify, redirect, render_template, request, url_for

from containers.errors import ContainerError
from portal.auth import login_required
from portal.db_session import backend as _backend
from portal.db_session import box as _box
from portal.db_session import db
from portal.db_session import settings as _settings
from portal.errors import PortalError, ValidationError
from portal.services import images, registries
from slurm.errors import SlurmError
from storage.errors import StorageError
from portal.web.common import bp


# -- images ------------------------------------------------------------------------------------

@bp.route("/images", methods=["GET", "POST"])
@login_required
def images_page():
    """Register an image; the user's images with their conversion state; the SIF cache."""
    settings = _settings()
    errors: dict[str, str] = {}
    top: list[str] = []
    ref = ""
    if request.method == "POST":
        ref = request.form.get("ref", "").strip()
        try:
            img = images.register_image(db(), settings, _backend(), _box(), g.user, ref)
            flash("image registered: %s" % img.state.value, "info")
            return redirect(url_for("web.images_page"))
        except ValidationError as e:
            errors = dict(e.errors)
        except (SlurmError, ContainerError, StorageError, PortalError, OSError) as e:
            top.append(str(e))
    try:
        rows = images.list_images(db(), settings, _backend(), g.user)
    except SlurmError as e:
        db().rollback()
        top.append("conversion states may be out of date: %s" % e)
        rows = images.stored_images(db(), g.user)
    try:
        cache = images.cache_entries(db(), settings, g.user)
    except (OSError, ContainerError) as e:
        cache = []
        top.append("cannot read the image cache: %s" % e)
    return _render(rows, cache, ref=ref, errors=errors, top_errors=top), \
        422 if errors or (top and request.method == "POST") else 200


def _render(rows, cache, **kw):
    settings = _settings()
    kw.setdefault("errors", {})
    kw.setdefault("top_errors", [])
    kw.setdefault("login", {})
    return render_template("images.html", images=rows, cache=cache, image_cache=settings.image_cache,
                           site_images=registries.site_images(settings), accounts=registries.accounts(db(), g.user),
                           **kw)


@bp.route("/images/<int:image_id>/delete", methods=["POST"])
@login_required
def image_delete(image_id: int):
    """Delete a registered image (its owner or an admin); the flash says what became of its SIF."""
    done = images.delete_image(db(), _settings(), g.user, image_id)
    flash("image %s deleted (%s); its SIF %s" % (
        image_id, done.image.ref, "was removed from the cache" if done.sif_removed
        else "stays: " + "; ".join(done.kept_because)), "info")
    return redirect(url_for("web.images_page"))


@bp.route("/images/registries", methods=["POST"])
@login_required
def registry_login():
    """Add (or replace) the user's account at a registry: checked against it first."""
    form = {k: request.form.get(k, "").strip() for k in ("registry", "username")}
    try:
        registries.login(db(), _settings(), _box(), g.user, form["registry"], form["username"],
                         request.form.get("password", ""))
        flash("account for %s added (checked with the registry just now)" % form["registry"], "info")
        return redirect(url_for("web.images_page"))
    except ValidationError as e:
        errors, top = {"login_" + k: v for k, v in e.errors.items()}, []
    except PortalError as e:
        errors, top = {}, [str(e)]
    rows = images.stored_images(db(), g.user)
    return _render(rows, images.cache_entries(db(), _settings(), g.user), errors=errors, top_errors=top,
                   login=form), 422


@bp.route("/images/registries/<host>/delete", methods=["POST"])
@login_required
def registry_logout(host: str):
    registries.logout(db(), g.user, host)
    flash("forgot your account at %s" % host, "info")
    return redirect(url_for("web.images_page"))


@bp.route("/images/check")
@login_required
def image_check():
    """The job form checks the image field as it is typed (JSON; the page's session)."""
    ref = request.args.get("ref", "").strip()
    if not ref:
        return jsonify({"ref": "", "ok": False, "message": "give an image"})
    return jsonify(images.check_ref(db(), _settings(), _box(), g.user, ref).model_dump())

"""The images pages."""
from __future__ import annotations

from flask import flash, g, redirect, render_template, request, url_for

from containers.errors import ContainerError
from portal.auth import login_required
from portal.db_session import backend as _backend
from portal.db_session import box as _box
from portal.db_session import db
from portal.db_session import settings as _settings
from portal.errors import PortalError, ValidationError
from portal.services import images
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
    return render_template("images.html", images=rows, cache=cache, ref=ref, errors=errors, top_errors=top,
                           image_cache=settings.image_cache), 422 if errors or (top and request.method == "POST") else 200

"""The Dockerfile build page: upload a context (a .tar, or a Dockerfile and files), a tag; the
user's builds with their states; one build's live log."""
from __future__ import annotations

import io
import os
import tarfile
import tempfile

from flask import flash, g, redirect, render_template, request, url_for

from containers.errors import ContainerError
from portal.auth import login_required
from portal.db_session import backend as _backend
from portal.db_session import box as _box
from portal.db_session import db
from portal.db_session import settings as _settings
from portal.errors import PortalError, ValidationError
from portal.services import image_builds
from portal.web.common import bp
from slurm.errors import SlurmError


def _form_context(spool) -> str:
    """The form's upload as a tar in ``spool``: the .tar as sent, or a tar made of the Dockerfile
    (a file or the text box) and the other files (at the top of the context). Returns the
    Dockerfile's path in it."""
    dockerfile = (request.form.get("dockerfile_path") or "Dockerfile").strip()
    upload = request.files.get("context")
    if upload and upload.filename:
        upload.save(spool)
        spool.seek(0)
        return dockerfile
    text = request.form.get("dockerfile_text", "")
    df_file = request.files.get("dockerfile")
    content = df_file.read() if df_file and df_file.filename else text.replace("\r\n", "\n").encode()
    if not content.strip():
        raise ValidationError("context", "upload a context .tar, or a Dockerfile (file or text) and its files")
    with tarfile.open(fileobj=spool, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size, info.mode = len(content), 0o644
        tar.addfile(info, io.BytesIO(content))
        for f in request.files.getlist("files"):
            if not f.filename:
                continue
            name = os.path.basename(f.filename.replace("\\", "/"))
            data = f.read()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    spool.seek(0)
    return "Dockerfile"


@bp.route("/images/builds", methods=["GET", "POST"])
@login_required
def builds_page():
    settings = _settings()
    errors: dict[str, str] = {}
    top: list[str] = []
    tag = ""
    if request.method == "POST":
        request.max_content_length = (settings.image_build_context_limit_mb << 20) + (1 << 20)
        tag = request.form.get("tag", "").strip()
        try:
            with tempfile.TemporaryFile() as spool:
                dockerfile = _form_context(spool)
                build = image_builds.start_build(db(), settings, _backend(), _box(), g.user, spool, tag, dockerfile)
            flash("build %d submitted" % build.id, "info")
            return redirect(url_for("web.build_page", build_id=build.id))
        except ValidationError as e:
            errors = dict(e.errors)
        except (SlurmError, ContainerError, PortalError, OSError) as e:
            top.append(str(e))
    try:
        rows = image_builds.list_builds(db(), settings, _backend(), g.user)
    except (SlurmError, PortalError) as e:
        db().rollback()
        top.append("build states may be out of date: %s" % e)
        rows = image_builds.stored_builds(db(), g.user)
    return render_template("builds.html", builds=rows, build=None, tag=tag, errors=errors, top_errors=top), \
        422 if errors or (top and request.method == "POST") else 200


@bp.route("/images/builds/<int:build_id>")
@login_required
def build_page(build_id: int):
    build = image_builds.get_build(db(), g.user, build_id)
    top: list[str] = []
    try:
        image_builds.refresh_builds(db(), _settings(), _backend(), [build])
    except (SlurmError, PortalError) as e:
        db().rollback()
        top.append("the state may be out of date: %s" % e)
    return render_template("builds.html", builds=[], build=build, tag="", errors={}, top_errors=top)

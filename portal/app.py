"""Flask application factory."""
from __future__ import annotations

import logging
from typing import Any, Mapping

from flask import Flask, jsonify

from portal.errors import PortalError
from portal.settings import Settings
from slurm.backend import SlurmCli
from slurm.errors import SlurmError
from storage.credentials import SecretBox
from storage.errors import StorageError

# HTTP status of each storage error code (the data layer's errors name the location and the fix)
STORAGE_STATUS = {"bad_location": 400, "bad_credentials": 400, "access_denied": 403,
                  "store_unavailable": 503, "integrity_failed": 502, "staging_failed": 502,
                  "stage_out_pending": 502}


def create_app(test_config: Mapping[str, Any] | None = None, settings: Settings | None = None) -> Flask:
    """Build the app. ``settings`` (tests) or the settings file named by ``AIPORTAL_CONFIG``."""
    if settings is None:
        settings = Settings.load()
    app = Flask(__name__)
    app.config.update(SECRET_KEY=settings.secret_key, SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Lax")
    if test_config:
        app.config.update(test_config)
    app.extensions["aiportal.settings"] = settings
    app.extensions["aiportal.secrets"] = SecretBox(settings.data_key)
    app.extensions["aiportal.slurm"] = SlurmCli(settings.slurm_conf, settings.slurm_timeout_s,
                                                settings.cluster_name)
    if not app.debug and not app.testing:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from portal import api, auth, web
    app.register_blueprint(auth.bp)
    app.register_blueprint(web.bp)
    app.register_blueprint(api.bp, url_prefix="/api/v1")

    @app.get("/healthz")
    def healthz():
        # liveness only: says nothing about jobs, users or the cluster
        return "ok\n", 200, {"Content-Type": "text/plain"}

    @app.errorhandler(SlurmError)
    def slurm_error(e):
        return jsonify(error=e.code, message=str(e)), 503

    @app.errorhandler(StorageError)
    def storage_error(e):
        return jsonify(error=e.code, message=str(e)), STORAGE_STATUS.get(e.code, 400)

    @app.errorhandler(PortalError)
    def portal_error(e):
        return jsonify(error=e.code, message=str(e)), e.status

    return app

"""The Flask application factory: settings, engine, Slurm backend, blueprints, error handlers."""
from __future__ import annotations

import logging
from typing import Any, Mapping

import sqlalchemy as sa
import sqlalchemy.exc
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from portal import db as dbmod
from portal.errors import HANDLED, ValidationError, error_status
from portal.settings import Settings
from slurm.backend import SlurmCli
from storage.credentials import SecretBox

def create_app(test_config: Mapping[str, Any] | None = None, settings: Settings | None = None,
               engine: sa.Engine | None = None, backend=None) -> Flask:
    """Build the app from ``settings`` (tests) or the settings file named by ``AIPORTAL_CONFIG``.

    The database must be at the code's schema revision (``aiportal db upgrade``); tests pass an
    ``engine`` they migrated, and may pass a Slurm ``backend``."""
    if settings is None:
        settings = Settings.load()
    app = Flask(__name__)
    # the session cookie goes over HTTPS only where the portal is served over HTTPS (its portal_url)
    app.config.update(SECRET_KEY=settings.secret_key, SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_SECURE=settings.served_over_https,
                      MAX_CONTENT_LENGTH=16 * 1024 * 1024)
    if test_config:
        app.config.update(test_config)
    if settings.proxy_hops:
        # the client's address (login limits per address) and scheme come from the proxy's headers
        from werkzeug.middleware.proxy_fix import ProxyFix
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.proxy_hops, x_proto=settings.proxy_hops)
    if engine is None:
        engine = dbmod.make_engine(settings.database_url)
        dbmod.check_schema(engine)
    app.extensions["aiportal.settings"] = settings
    app.extensions["aiportal.engine"] = engine
    app.extensions["aiportal.secrets"] = SecretBox(settings.data_key)
    app.extensions["aiportal.slurm"] = backend or SlurmCli(settings.slurm_conf, settings.slurm_timeout_s,
                                                           settings.cluster_name)
    if not app.debug and not app.testing:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from portal import api, auth, db_session, web
    db_session.init_app(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(web.bp)
    app.register_blueprint(api.bp, url_prefix="/api/v1")

    @app.get("/healthz")
    def healthz():
        # liveness only: says nothing about jobs, users or the cluster
        return "ok\n", 200, {"Content-Type": "text/plain"}

    _error_handlers(app)
    return app


def _error_handlers(app: Flask) -> None:
    def as_json(e: Exception):
        code, status = error_status(e)
        body = {"error": code, "message": str(e)}
        if isinstance(e, ValidationError):
            body["errors"] = e.errors
        resp = jsonify(body)
        resp.status_code = status
        if getattr(e, "retry_after", None) is not None:     # rate limits, a request still in flight
            resp.headers["Retry-After"] = str(e.retry_after)
        return resp

    for cls in HANDLED:
        app.register_error_handler(cls, as_json)

    @app.errorhandler(sqlalchemy.exc.OperationalError)
    def database_down(e: Exception):
        # nothing could be stored (nor read): say so, and when to try again (an Idempotency-Key
        # makes the retry safe); never a 500 with the driver's text
        app.logger.error("the database did not answer: %s", e)
        resp = jsonify(error="database_unavailable",
                       message="the portal's database did not answer, so nothing was stored; try again shortly")
        resp.status_code = 503
        resp.headers["Retry-After"] = "5"
        return resp

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        if request.path.startswith("/api/") or request.path.startswith("/service/") \
                or request.accept_mimetypes.best == "application/json":
            resp = jsonify(error=(e.name or "error").lower().replace(" ", "_"), message=e.description)
            resp.status_code = e.code or 500
            for key, value in e.get_headers():      # e.g. Allow on 405
                if key.lower() != "content-type":
                    resp.headers[key] = value
            return resp
        return e

"""What a request works with: one database session (opened on first use, closed when the
request ends, rolled back unless the view committed), and the app's settings, Slurm backend
and secret box."""
from __future__ import annotations

from flask import Flask, current_app, g
from sqlmodel import Session


def db() -> Session:
    if "db" not in g:
        g.db = Session(current_app.extensions["aiportal.engine"], expire_on_commit=False)
    return g.db


def settings():
    return current_app.extensions["aiportal.settings"]


def backend():
    return current_app.extensions["aiportal.slurm"]


def box():
    return current_app.extensions["aiportal.secrets"]


def init_app(app: Flask) -> None:
    @app.teardown_appcontext
    def _close(_exc):
        session = g.pop("db", None)
        if session is not None:
            session.close()

"""The API's own document, and the caller's account."""
from __future__ import annotations

from flask import g, jsonify

from portal.api.openapi import openapi_document
from portal.api.operations import answer, operation
from portal.db_session import db
from portal.models.accounts import Me
from portal.services import accounts


@operation("GET", "/openapi.json", "this document (no token needed)", {200: {"type": "object"}}, auth=False)
def openapi():
    return jsonify(openapi_document())


@operation("GET", "/me", "the caller's account", {200: Me})
def me():
    u = g.user
    return answer(Me(name=u.name, unix_user=u.unix_user, is_admin=u.is_admin,
                     projects=[p.name for p in accounts.projects_of(db(), u)]))

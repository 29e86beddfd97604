"""The API's own document, and the caller's account: who it is, its web sessions, and "log out
everywhere" (ends every web session of the account, the caller's own too; API tokens stay)."""
from __future__ import annotations

from flask import g, jsonify

from portal.api.openapi import openapi_document
from portal.api.operations import answer, operation
from portal.db_session import db
from portal.auth import current_session_id, session_limits
from portal.models.accounts import Me, SessionList, SessionPublic, SessionsEnded
from portal.services import accounts, web_sessions


@operation("GET", "/openapi.json", "this document (no token needed)", {200: {"type": "object"}}, auth=False)
def openapi():
    return jsonify(openapi_document())


@operation("GET", "/me", "the caller's account", {200: Me})
def me():
    u = g.user
    return answer(Me(name=u.name, unix_user=u.unix_user, is_admin=u.is_admin,
                     projects=[p.name for p in accounts.projects_of(db(), u)]))


@operation("GET", "/sessions", "the caller's logged-in browsers (web sessions)", {200: SessionList})
def list_sessions():
    current = web_sessions.session_record(db(), current_session_id() or "")
    return answer(SessionList(sessions=[SessionPublic.of(s, current is not None and s.id == current.id)
                                        for s in web_sessions.list_sessions(db(), g.user, session_limits())]))


@operation("POST", "/sessions/revoke", "log out everywhere: end every web session of the caller's account "
           "(the caller's own too; API tokens are not touched)", {200: SessionsEnded})
def revoke_sessions():
    ended = web_sessions.end_sessions(db(), g.user)
    db().commit()
    return answer(SessionsEnded(ended=ended))

"""``POST|PUT /service/NAME``: the inference router (the front door of every service).

Authentication: ``Authorization: Bearer TOKEN``, an API token of the service's owner (or of an
admin). Another user's service is "not found", like an unknown one. Checked tokens are
remembered for ``router_refresh_s`` (a revoked token stops working within that time).

Each portal process keeps the routing table (services and their READY replicas, from the
database the controller writes) for ``router_refresh_s`` seconds, so a request costs no
database query; :class:`inference.router.Router` picks the replica (least outstanding
requests), retries another one when a replica refused or dropped the connection, and the
answer is streamed back with the replica's status and Content-Type (plus ``X-Model-Version``
and ``X-Replica``).
"""
from __future__ import annotations

import hashlib
import threading
import time

from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context

from inference.errors import InferenceError
from inference.router import Router, Target
from portal.db_session import db
from portal.services import accounts
from portal.services.inference import routing_table

bp = Blueprint("router", __name__)


class RoutingCache:
    """The routing table and checked tokens of this process, refreshed every ``ttl`` seconds."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self.lock = threading.Lock()
        self.table: dict = {}
        self.loaded = 0.0
        self.tokens: dict[str, tuple[float, int | None, bool]] = {}

    def services(self):
        now = time.monotonic()
        if now - self.loaded > self.ttl:
            table = routing_table(db())
            with self.lock:
                self.table, self.loaded = table, now
                # forget tokens checked before this refresh (revocations take effect)
                self.tokens = {k: v for k, v in self.tokens.items() if now - v[0] <= self.ttl}
        return self.table

    def user(self, token: str) -> tuple[int | None, bool]:
        """(user id, is admin) of a token; (None, False) for a bad one."""
        key = hashlib.sha256(token.encode()).hexdigest()
        hit = self.tokens.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[0] <= self.ttl:
            return hit[1], hit[2]
        session = db()
        user = accounts.user_for_token(session, token, current_app.extensions["aiportal.settings"].admin_token_sha256)
        if session.new or session.dirty:
            session.commit()
        found = (user.id, user.is_admin) if user is not None else (None, False)
        with self.lock:
            self.tokens[key] = (now, *found)
        return found


def _error(status: int, code: str, message: str, **headers):
    resp = jsonify(error=code, message=message)
    resp.status_code = status
    resp.headers.update(headers)
    return resp


def _state():
    ext = current_app.extensions
    if "aiportal.router" not in ext:
        settings = ext["aiportal.settings"]
        ext["aiportal.router"] = (Router(timeout=settings.router_timeout_s), RoutingCache(settings.router_refresh_s))
    return ext["aiportal.router"]


@bp.route("/service/<name>", methods=["POST", "PUT"])
def serve(name: str):
    router, cache = _state()
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _error(401, "unauthorized", "send 'Authorization: Bearer TOKEN' with an API token of the service's "
                                           "owner (`aiportal token create`, or the Tokens page)",
                      **{"WWW-Authenticate": 'Bearer realm="aiportal"'})
    user_id, is_admin = cache.user(token.strip())
    if user_id is None:
        return _error(401, "unauthorized", "the API token is unknown, revoked or expired; create a new one "
                                           "(`aiportal token create`)", **{"WWW-Authenticate": 'Bearer realm="aiportal"'})
    entry = cache.services().get(name)
    if entry is None or (entry[1] != user_id and not is_admin):
        return _error(404, "unknown_service", "there is no service named %r that you may call; your services: "
                                              "`aiportal service list`" % name)
    _sid, _owner, max_body, ready = entry
    length = request.content_length
    if length is None and request.headers.get("Transfer-Encoding", "").lower() != "chunked":
        return _error(411, "length_required", "send the input as the request body with a Content-Length "
                                              "(curl -X POST URL -T FILE)")
    if max_body and length is not None and length > max_body:
        return _error(413, "too_large", "the body is %d bytes; service %s takes at most %d" % (length, name, max_body),
                      Connection="close")
    if max_body:
        request.max_content_length = max_body      # the service's limit, not the portal's forms'
    body = request.get_data(cache=False)
    if max_body and len(body) > max_body:
        return _error(413, "too_large", "the body is over %d bytes, the most service %s takes" % (max_body, name))
    targets = [Target(rid, host, port, version) for rid, host, port, version in ready]
    try:
        up = router.forward(targets, request.method, body, dict(request.headers), service=name)
    except InferenceError as e:
        return _error(e.status, e.code, str(e), **({"Retry-After": "1"} if e.status == 503 else {}))
    headers = dict(up.headers)
    headers["X-Replica"] = up.target.key[:8]
    length = up.resp.getheader("Content-Length")
    if length is not None:
        headers["Content-Length"] = length
    return Response(stream_with_context(up.body()), status=up.status, headers=headers, direct_passthrough=True)

"""The inference gateway: an asyncio HTTP/1.1 server for ``POST|PUT /service/NAME``.

It is the front door of every service (in a deployment the portal's web server passes
``/service/`` to it; see docs/inference.md). Per request:

1. ``Authorization: Bearer TOKEN`` and the service name go to a :class:`Directory` (the portal
   implements it on its database, cached), which answers a :class:`Route`: the service's ready
   replicas and body limit, or an error (401 unknown token, 404 unknown or another user's
   service);
2. the body is read (``Content-Length`` or chunked; ``Expect: 100-continue`` is answered once
   the checks passed; over the service's limit: 413). A refused request's body is read and
   thrown away before the answer (up to the largest service limit), so that the web server in
   front, which sends the whole body before it reads an answer, gets it;
3. :class:`~inference.balancer.Balancer` picks a replica; the request goes to it over a
   kept-alive connection, with the service's key (``X-Aiportal-Key``: replicas answer only
   requests that carry it), and the answer is streamed back (status, Content-Type,
   ``X-Model-Version``, plus ``X-Replica``);
4. a replica that refused or dropped the connection before answering, or answered 503 (loading
   or draining: nothing reached the model), is ejected for a while and the next one is tried;
   a replica that took the request and did not answer within ``timeout`` gets 504 and the
   request is not sent again (a model never sees a request twice after it may have run it).

One event loop, no threads on the request path (the directory's database reads run in a
thread pool, off the hot path). Uses uvloop when it is installed.

Modules: :mod:`~inference.gateway.http1` (request heads, the gateway's own answers, chunked
bodies), :mod:`~inference.gateway.routes` (the :class:`Directory` protocol and the
:class:`Route` it answers), :mod:`~inference.gateway.upstream` (kept-alive connections to
replicas), :mod:`~inference.gateway.server` (:class:`Gateway` and :func:`run`, the process
entry); the balancing policy is :mod:`inference.balancer`.
"""
from inference.balancer import Target
from inference.gateway.http1 import GatewayError, Request, parse_head
from inference.gateway.routes import Directory, Route
from inference.gateway.server import Gateway, run

__all__ = ["Directory", "Gateway", "GatewayError", "Request", "Route", "Target", "parse_head", "run"]

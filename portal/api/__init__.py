"""JSON API under /api/v1 (OpenAPI document: /api/v1/openapi.json, generated from the route
table below and the models in :mod:`portal.models`).

Views only: each parses its body into a create model, calls a use case in
:mod:`portal.services`, and answers a public model. Every view is declared with :func:`operation`,
which registers the Flask route (behind the token check unless ``auth=False``) and the
operation's document entry (body model, answers, error statuses, query parameters) in one place,
so the document cannot miss a route.

Errors are ``{"error": code, "message": ...}`` with 400 (bad request), 401 (no or bad token),
403 (not allowed), 404 (no such thing, or someone else's), 409 (conflict), 422 (invalid
fields; ``errors`` maps each field to its message), 429 (rate limit), 503 (Slurm or the log
host unreachable); :func:`portal.errors.error_status` maps each error class.
"""
from portal.api.operations import OPERATIONS, bp  # noqa: F401 (the app registers bp; the document reads OPERATIONS)
# the views, one module per resource (they register on ``bp`` and in OPERATIONS)
from portal.api import account, cluster, datasources, images, jobs, services, tokens  # noqa: F401
from portal.api import builds, registries  # noqa: F401  (Dockerfile builds, under /images/build*; accounts)
from portal.api import stage_out  # noqa: F401  (finishing a job's pending stage-out, under /jobs/ID/stage-out)

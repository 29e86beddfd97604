"""Server-rendered pages (Flask + Jinja; no JS build step, a few lines of inline vanilla JS).

Every page is behind :func:`portal.auth.login_required` (which also checks the CSRF token of
every POST). Users see their own jobs, images, data sources and tokens; admins see every job.
The pages call the same service layer as the JSON API; what a form got wrong is shown next to
its field, with the user's input kept.

| page | route |
| --- | --- |
| jobs (paged, filter by state) | ``GET /`` and ``GET /jobs?page=N&state=S`` |
| new job (show script / submit) | ``GET|POST /jobs/new`` (``?from=JOB`` fills it from a job) |
| job (timeline, log, plot, outputs) | ``GET /jobs/ID``, ``GET /jobs/ID/plot.svg``, ``POST /jobs/ID/cancel|resubmit`` |
| cluster (admins: drain/resume) | ``GET /cluster``, ``POST /cluster/nodes/NODE/drain|resume`` |
| images | ``GET|POST /images`` |
| Dockerfile builds (upload, list, live log) | ``GET|POST /images/builds``, ``GET /images/builds/ID`` |
| data sources (browse a prefix) | ``GET /data?source=NAME&prefix=s3://...``, ``POST /data``, ``POST /data/NAME/delete`` |
| account: API tokens, web sessions, password | ``GET|POST /tokens``, ``POST /tokens/ID/revoke``, ``POST /account/sessions/revoke`` (log out everywhere), ``POST /account/password`` |
| inference services (deploy, scale, update, delete) | ``GET|POST /services``, ``POST /services/NAME/scale|update|delete`` |
"""
from portal.web.common import bp  # noqa: F401 (the app registers it)
# the views, one module per resource (they register on ``bp``)
from portal.web import cluster, data, images, jobs, services, tokens  # noqa: F401
from portal.web import builds  # noqa: F401  (Dockerfile builds, linked from the images page)

"""The front door's nginx (ansible/roles/portal/templates/nginx.conf.j2, rendered here with the
role's defaults but a port and folders of its own, in front of the installed portal's and
router's sockets): a method a path does not serve gets 405 with ``Allow`` from the portal or
the router. nginx refuses TRACE itself, before any location, with an HTML 405 and no Allow."""
from __future__ import annotations

import http.client
import subprocess
import time
from pathlib import Path

import jinja2
import pytest
import yaml

from tests.conftest import REPO, free_port, stop_process

pytestmark = [pytest.mark.portal]
ROLE = REPO / "ansible" / "roles" / "portal"
COMMON = REPO / "ansible" / "roles" / "common" / "defaults" / "main.yml"


@pytest.fixture
def front_door(tmp_path):
    """The template's nginx on a free port of 127.0.0.1:9100-9199; stopped by pid at the end."""
    values = {**yaml.safe_load(COMMON.read_text()), **yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())}
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    env.filters["bool"] = lambda v: v if isinstance(v, bool) else str(v).strip().lower() in ("true", "yes", "on", "1")

    def render(v):
        try:
            return env.from_string(v).render(values) if isinstance(v, str) else v
        except jinja2.TemplateError:        # inventory facts, Ansible's filters: not the front door's
            return v
    for _ in range(3):      # the defaults refer to each other ({{ aiportal_run_dir }}/front, ...)
        values = {k: render(v) for k, v in values.items()}
    sockets = Path(values["aiportal_portal_socket"]), Path(values["aiportal_router_socket"])
    if not all(s.is_socket() for s in sockets):
        pytest.skip("the installed portal's sockets %s are not there (make run starts them)" % (sockets,))
    port = free_port(range(9150, 9200))
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / "nginx" / sub).mkdir(parents=True)
    # plain HTTP: the methods are answered by the same server block with TLS on (the installed
    # front door's HTTPS is tested in test_live_portal.py)
    values.update(aiportal_portal_port=port, aiportal_run_dir=str(tmp_path), aiportal_log_dir=str(tmp_path),
                  aiportal_state_dir=str(tmp_path), aiportal_portal_tls=False)
    conf = tmp_path / "nginx.conf"
    conf.write_text(env.from_string((ROLE / "templates" / "nginx.conf.j2").read_text()).render(values))
    subprocess.run(["nginx", "-t", "-c", str(conf)], check=True, capture_output=True, timeout=30)
    proc = subprocess.Popen(["nginx", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "nginx-error.log").read_text()
            time.sleep(0.1)
    yield port
    stop_process(proc)


@pytest.mark.parametrize("method", ["TRACE", "PATCH", "PUT"])
@pytest.mark.parametrize("path, allowed", [("/api/v1/tokens", {"GET", "POST"}), ("/api/v1/jobs", {"GET", "POST"}),
                                           ("/service/no-such-service", {"POST", "PUT"})])
def test_a_method_a_path_does_not_serve_gets_405_with_allow(front_door, method, path, allowed):
    if method in allowed:
        pytest.skip("%s is served at %s" % (method, path))
    conn = http.client.HTTPConnection("127.0.0.1", front_door, timeout=10)
    conn.request(method, path)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 405, (method, path, resp.status)
    assert allowed <= {m.strip() for m in (resp.getheader("Allow") or "").split(",")}, resp.getheaders()

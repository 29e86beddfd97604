"""Large bodies to ``/service/NAME`` through the portal's front door (nginx on 127.0.0.1:8443,
as `make run` installs it, in front of `aiportal router`): every refusal is the router's JSON
answer, whatever the body's size. The router used to answer and close before it had read the
body; nginx, still sending it, then answered some of them with its own HTML 502.

The service is a throwaway user's (its Unix account: alice), deployed with no replica (min_replicas 0: no Slurm job); refusals need
none. Bodies are made once and sent 50 times per size."""
from __future__ import annotations

import http.client
import json
import os
import pwd
import shutil
import subprocess
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from tests.conftest import SHARED_ROOT
from tests.inference.conftest import TOY
from tests.portal.conftest import api_call

pytestmark = [pytest.mark.portal]
HOST, PORT = "127.0.0.1", 8443      # nginx over HTTPS, the portal's one address (DESIGN.md port plan)
MB = 1024 * 1024
#: requests per body size
ROUNDS = 50
#: a wrong token only now and then: wrong tokens may be rate-limited per client address
WRONG_TOKEN_EVERY = 10
#: the live portal, for api_call
PORTAL = SimpleNamespace(url="https://%s:%d" % (HOST, PORT))


@pytest.fixture(scope="module")
def alice():
    """An API token of a throwaway portal user of the test's own (its jobs would run as the Unix
    account alice; alice's own portal account and objects are not touched), made with the
    installed CLI as root; the user is disabled at the end (its tokens with it)."""
    name = "frontdoor-%s" % uuid.uuid4().hex[:8]
    res = subprocess.run(["aiportal", "user", "add", name, "--unix-user", "alice"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    try:
        res = subprocess.run(["aiportal", "token", "create", "--user", name, "--name", "front-door-test",
                              "--expires-days", "1"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        yield res.stdout.strip()
    finally:
        subprocess.run(["aiportal", "user", "disable", name], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def service(alice, base_image):
    """A service of the throwaway user's, with the default body limit (16 MiB) and no replica; deleted at the end."""
    pw = pwd.getpwnam("alice")
    model = SHARED_ROOT / "users" / "alice" / ("front-door-test-%s" % uuid.uuid4().hex[:8])
    shutil.copytree(TOY, model, ignore=shutil.ignore_patterns("__pycache__"))
    for dirpath, _, filenames in os.walk(model):
        for n in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
            os.chown(n, pw.pw_uid, pw.pw_gid)
    name = "front-door-%s" % uuid.uuid4().hex[:8]
    try:
        status, svc = api_call(PORTAL, "POST", "/services", alice, {"name": name, "image": str(base_image),
                                                                    "model": str(model), "min_replicas": 0})
        assert status == 201, svc
        yield name
    finally:
        api_call(PORTAL, "DELETE", "/services/%s" % name, alice)
        shutil.rmtree(model, ignore_errors=True)


def send(path: str, token: str | None, body: bytes) -> tuple[int, str, dict | bytes]:
    """(status, content type, parsed JSON or raw bytes) of one POST through the front door;
    status 0 when the connection failed."""
    conn = http.client.HTTPSConnection(HOST, PORT, timeout=120)     # the system's CAs: the dev CA among them
    try:
        headers = {"Content-Type": "application/octet-stream"}
        if token:
            headers["Authorization"] = "Bearer " + token
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        raw = r.read()
        ctype = r.getheader("Content-Type", "")
        return r.status, ctype, json.loads(raw) if ctype.startswith("application/json") else raw[:200]
    except OSError as e:
        return 0, "", str(e) or type(e).__name__
    finally:
        conn.close()


def case(i: int, service: str, token: str) -> tuple[str, str, str | None, int, str]:
    """The i-th request: (what, path, token, the status and error code it must get)."""
    if i % 4 == 0:
        return "no token", "/service/" + service, None, 401, "unauthorized"
    if i % 4 == 2:
        return "unknown service", "/service/no-such-%s" % uuid.uuid4().hex[:8], token, 404, "unknown_service"
    if i % WRONG_TOKEN_EVERY == 1:
        return "wrong token", "/service/" + service, "wrong-" + uuid.uuid4().hex, 401, "unauthorized"
    return "over the limit", "/service/" + service, token, 413, "too_large"


@pytest.mark.parametrize("size_mb", [20, 100])
def test_large_bodies_get_the_routers_json_answer_every_time(alice, service, size_mb):
    body = os.urandom(MB) * size_mb         # made once, sent ROUNDS times
    cases = [case(i, service, alice) for i in range(ROUNDS)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda c: send(c[1], c[2], body), cases))
    counts = Counter()
    wrong = []
    for (what, _, _, status, code), (got, ctype, out) in zip(cases, answers):
        counts[(what, got, ctype.split(";")[0])] += 1
        if got != status or not isinstance(out, dict) or out.get("error") != code or (
                got == 413 and "at most %d" % (16 * MB) not in out["message"]):   # nginx's own: over 1 GiB only
            wrong.append((what, got, ctype, out))
    print("%d MB: %s" % (size_mb, dict(counts)))
    assert not wrong, "%d of %d answers wrong (%s); first: %s" % (len(wrong), ROUNDS, dict(counts), wrong[:3])

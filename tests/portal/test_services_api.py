"""Services through the Flask test client (no cluster): validation naming the field, users see
only their own services, scale/update/delete, the service's key, the router's directory, the
Services page."""
from __future__ import annotations

import pytest
from sqlmodel import Session, select

from portal.models import Service
from portal.daemons.controller import ServiceController
from slurm.states import JobState
from tests.portal.conftest import ADMIN_TOKEN, bearer, csrf_of, login



def body(image, model_dir, **kw):
    return {"name": "toy", "image": image, "model": model_dir, **kw}


def test_deploy_list_show_scale_update_delete(client, tokens, fake_backend, image, model_dir, engine, settings):
    alice, bob = bearer(tokens["alice"]), bearer(tokens["bob"])
    r = client.post("/api/v1/services", headers=alice, json=body(image, model_dir, min_replicas=1, max_replicas=3))
    assert r.status_code == 201, r.get_json()
    svc = r.get_json()
    assert svc["url"] == "/service/toy" and svc["state"] == "RUNNING" and svc["desired_replicas"] == 1
    assert client.post("/api/v1/services", headers=bob, json=body(image, model_dir)).status_code in (409, 422)
    assert client.get("/api/v1/services", headers=bob).get_json()["services"] == []
    assert client.get("/api/v1/services/toy", headers=bob).status_code == 404
    assert [s["name"] for s in client.get("/api/v1/services", headers=bearer(tokens["root-admin"])).get_json()["services"]] == ["toy"]
    # the controller submits the replica as alice, on infer, unlimited, with the runtime bound read-only
    ServiceController(engine, fake_backend, settings).cycle()
    script, user = fake_backend.submitted[0]
    assert user == "alice" and "#SBATCH --partition=infer" in script and "#SBATCH --time=UNLIMITED" in script
    assert "runtime.py:/aiportal/runtime.py:ro" in script and "#SBATCH --no-requeue" in script
    assert "python3 /aiportal/runtime.py --config /aiportal/run/runtime.json" in script
    shown = client.get("/api/v1/services/toy", headers=alice).get_json()
    assert shown["replicas"][0]["phase"] == "PENDING" and shown["replicas"][0]["slurm_job_id"]
    r = client.post("/api/v1/services/toy/scale", headers=alice, json={"replicas": 2})
    assert r.status_code == 200 and (r.get_json()["min_replicas"], r.get_json()["max_replicas"]) == (2, 2)
    r = client.post("/api/v1/services/toy/scale", headers=alice, json={"min_replicas": 3, "max_replicas": 2})
    assert r.status_code == 422 and "max_replicas" in r.get_json()["errors"]
    r = client.post("/api/v1/services/toy/update", headers=alice, json={"version": "2"})
    assert r.status_code == 202 and r.get_json()["state"] == "UPDATING" and r.get_json()["next_spec"]["version"] == "2"
    assert client.post("/api/v1/services/toy/update", headers=alice, json={"version": "3"}).status_code == 409
    r = client.delete("/api/v1/services/toy", headers=alice)
    assert r.status_code == 202 and r.get_json()["state"] == "DELETING"


def test_a_gray_release_starts_with_a_weight_changes_it_and_ends_at_0_or_100(client, tokens, fake_backend, image,
                                                                           model_dir, engine, settings):
    from inference.controller import Phase
    from portal.models import ServiceReplica
    from portal.daemons.router import routing_table
    alice = bearer(tokens["alice"])
    assert client.post("/api/v1/services", headers=alice, json=body(image, model_dir)).status_code == 201
    up = lambda **b: client.post("/api/v1/services/toy/update", headers=alice, json=b)  # noqa: E731
    for bad in (0, 100, -1, 101, "10", True):
        r = up(version="2", weight=bad)
        assert r.status_code == 422 and "weight" in r.get_json()["errors"], (bad, r.get_json())
    r = up(weight=50)
    assert r.status_code == 409 and "no gray release under way" in r.get_json()["message"]
    r = up(version="2", weight=10)
    assert r.status_code == 202 and r.get_json()["next_weight"] == 10 and "10%" in r.get_json()["message"]
    assert up(version="3", weight=10).status_code == 409          # one new version at a time
    # the controller runs one canary beside the current replica; the router weighs them 10/90
    ServiceController(engine, fake_backend, settings).cycle()
    with Session(engine) as db:
        rows = db.exec(select(ServiceReplica)).all()
        assert sorted((r.generation, r.version) for r in rows) == [(1, "1"), (2, "2")]
        for r in rows:
            r.phase, r.host, r.port = Phase.READY, "127.0.0.1", 7000 + r.generation
            db.add(r)
        db.commit()
        weights = {(t.version, t.weight) for t in routing_table(db)["toy"].targets}
    assert weights == {("1", 90), ("2", 10)}
    r = up(weight=25)
    assert r.status_code == 202 and r.get_json()["next_weight"] == 25
    r = up(weight=100)
    assert r.status_code == 202 and r.get_json()["next_weight"] is None and r.get_json()["state"] == "UPDATING"
    assert "rolling update to version 2" in r.get_json()["message"]
    assert up(weight=0).status_code == 409                        # a rolling update is not a gray release
    with Session(engine) as db:
        assert {t.weight for t in routing_table(db)["toy"].targets} == {100}


def test_stopping_a_gray_release_keeps_the_current_version(client, tokens, fake_backend, image, model_dir):
    alice = bearer(tokens["alice"])
    assert client.post("/api/v1/services", headers=alice, json=body(image, model_dir)).status_code == 201
    assert client.post("/api/v1/services/toy/update", headers=alice, json={"version": "2", "weight": 5}).status_code == 202
    r = client.post("/api/v1/services/toy/update", headers=alice, json={"weight": 0})
    out = r.get_json()
    assert r.status_code == 202 and out["state"] == "RUNNING" and out["next_spec"] is None and out["version"] == "1"
    assert "stopped" in out["message"]


def test_a_services_key_is_sealed_in_the_database_and_reaches_only_runtime_json_and_the_router(
        client, tokens, fake_backend, image, model_dir, engine, settings, caplog):
    import asyncio
    import json
    import logging
    import os
    import pwd
    from pathlib import Path

    import sqlalchemy as sa

    from inference.gateway import Route
    from portal.models import ServiceReplica
    from portal.daemons.router import PortalDirectory
    from portal.daemons.router import routing_table
    from storage.credentials import SecretBox
    caplog.set_level(logging.DEBUG)
    alice = bearer(tokens["alice"])
    r = client.post("/api/v1/services", headers=alice, json=body(image, model_dir))
    assert r.status_code == 201
    answers = [r.get_data(as_text=True)]
    with Session(engine) as db:
        sealed = db.exec(select(Service)).one().key_sealed
        row = db.execute(sa.text("SELECT * FROM services")).one()
    key = SecretBox(settings.data_key).open(sealed)
    assert len(key) >= 43 and key not in sealed
    assert not any(key in str(v) for v in row), "the key is in the services table in clear"
    ServiceController(engine, fake_backend, settings).cycle()
    # the replica's runtime.json has it, private to alice; the batch script does not
    script, user = fake_backend.submitted[0]
    assert user == "alice" and key not in script
    with Session(engine) as db:
        replica = db.exec(select(ServiceReplica)).one()
    cfg_path = Path(replica.job_dir) / "run" / "runtime.json"
    assert json.loads(cfg_path.read_text())["key"] == key
    st = os.stat(cfg_path)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == pwd.getpwnam("alice").pw_uid
    # the API answers never show it
    answers += [client.get(p, headers=alice).get_data(as_text=True) for p in ("/api/v1/services",
                                                                             "/api/v1/services/toy")]
    scaled = client.post("/api/v1/services/toy/scale", headers=alice, json={"replicas": 2})
    answers.append(scaled.get_data(as_text=True))
    assert all(key not in a for a in answers)
    # the router: the routing table has it sealed, the directory opens it into the route
    with Session(engine) as db:
        assert routing_table(db)["toy"].key_sealed == sealed
    route = asyncio.run(PortalDirectory(engine, settings).route(tokens["alice"], "toy"))
    assert isinstance(route, Route) and route.key == key and key not in repr(route)
    assert key not in caplog.text
    # a service from before keys (NULL) keeps working without one: its next replica (it was
    # scaled to 2 above) runs without a key, and the router sends none
    with Session(engine) as db:
        svc = db.exec(select(Service)).one()
        svc.key_sealed = None
        db.add(svc)
        db.commit()
    ServiceController(engine, fake_backend, settings).cycle()
    with Session(engine) as db:
        new = db.exec(select(ServiceReplica).where(ServiceReplica.id != replica.id)).one()
    assert json.loads((Path(new.job_dir) / "run" / "runtime.json").read_text())["key"] is None
    assert asyncio.run(PortalDirectory(engine, settings).route(tokens["alice"], "toy")).key == ""


@pytest.mark.parametrize("change, field", [
    ({"name": "Bad_Name"}, "name"), ({"name": None}, "name"), ({"image": "relative.sif"}, "image"),
    ({"image": "/srv/none.sif"}, "image"), ({"model": ""}, "model"), ({"model_file": "../x.py"}, "model_file"),
    ({"class_name": "not a class"}, "class_name"), ({"gpus": 2}, "gpus"), ({"max_batch_size": 0}, "max_batch_size"),
    ({"min_replicas": 2, "max_replicas": 1}, "max_replicas"), ({"version": "a b"}, "version"),
    ({"model": "/srv/aiportal/shared/users/bob"}, "model"), ({"colour": "red"}, "body"),
])
def test_invalid_deploys_name_the_field_and_store_nothing(client, tokens, fake_backend, image, model_dir, engine,
                                                          change, field):
    r = client.post("/api/v1/services", headers=bearer(tokens["alice"]), json={**body(image, model_dir), **change})
    assert r.status_code == 422 and field in r.get_json()["errors"], r.get_json()
    with Session(engine) as db:
        assert db.exec(select(Service)).first() is None


def test_the_routers_directory_answers_owners_and_admins_and_refuses_the_rest(client, tokens, fake_backend, image,
                                                                              model_dir, engine, settings):
    """The router's questions to the database (portal/daemons/router.py), then its answers through a
    gateway: bad tokens 401, another user's service 404 like an unknown one, an admin may call."""
    import asyncio
    import http.client
    import json

    from inference.gateway import GatewayError
    from portal.daemons.router import PortalDirectory
    from tests.inference.conftest import GatewayThread
    from tests.conftest import free_port
    assert client.post("/api/v1/services", headers=bearer(tokens["alice"]), json=body(image, model_dir)).status_code == 201

    async def ask(directory, token, name):
        try:
            route = await directory.route(token, name)
        except GatewayError as e:
            return e.status, e.code
        return 200, route

    directory = PortalDirectory(engine, settings)
    status, route = asyncio.run(ask(directory, tokens["alice"], "toy"))
    assert status == 200 and route.service == "toy" and route.targets == () and route.max_body > 0
    assert asyncio.run(ask(PortalDirectory(engine, settings), tokens["root-admin"], "toy"))[0] == 200
    assert asyncio.run(ask(PortalDirectory(engine, settings), tokens["bob"], "toy")) == (404, "unknown_service")
    assert asyncio.run(ask(PortalDirectory(engine, settings), tokens["alice"], "nope")) == (404, "unknown_service")
    assert asyncio.run(ask(PortalDirectory(engine, settings), "not-a-token", "toy")) == (401, "unauthorized")
    assert asyncio.run(ask(PortalDirectory(engine, settings), ADMIN_TOKEN, "toy"))[0] == 200  # the bootstrap token

    # a service deployed after the table was read: found at once, not after router_refresh_s
    from dataclasses import replace
    slow = PortalDirectory(engine, replace(settings, router_refresh_s=3600))

    async def before_and_after():
        first = await ask(slow, tokens["alice"], "toy2")
        assert client.post("/api/v1/services", headers=bearer(tokens["alice"]),
                           json=body(image, model_dir, name="toy2")).status_code == 201
        await asyncio.sleep(0.06)
        then = await ask(slow, tokens["alice"], "toy2")
        await slow.close()
        return first, then
    first, then = asyncio.run(before_and_after())
    assert first == (404, "unknown_service") and then[0] == 200 and then[1].service == "toy2"

    gw = GatewayThread(PortalDirectory(engine, settings), free_port(range(9150, 9200)))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        conn.request("POST", "/service/toy", body=b"x", headers=bearer(tokens["alice"]))
        r = conn.getresponse()
        out = json.loads(r.read())
        assert r.status == 503 and "no ready replica" in out["message"] and r.getheader("Retry-After") == "1"
        conn.request("POST", "/service/toy", body=b"x", headers=bearer(tokens["bob"]))
        r = conn.getresponse()
        assert r.status == 404 and json.loads(r.read())["error"] == "unknown_service"
    finally:
        gw.close()


def test_services_page_deploys_and_shows_field_errors(client, users, fake_backend, image, model_dir):
    login(client)
    r = client.get("/services")
    assert r.status_code == 200 and b"Deploy a model" in r.data
    r = client.post("/services", data={"csrf": csrf_of(client, "/services"), "name": "Bad Name", "image": image,
                                       "model": model_dir})
    assert r.status_code == 422 and b'id="err-name"' in r.data
    r = client.post("/services", data={"csrf": csrf_of(client, "/services"), "name": "web-toy", "image": image,
                                       "model": model_dir, "min_replicas": "1", "max_replicas": "2"})
    assert r.status_code == 302
    page = client.get("/services").get_data(as_text=True)
    assert 'id="svc-web-toy"' in page and "/service/web-toy" in page
    r = client.post("/services/web-toy/scale", data={"csrf": csrf_of(client, "/services"), "min_replicas": "2",
                                                      "max_replicas": "2"})
    assert r.status_code == 302
    r = client.post("/services/web-toy/delete", data={"csrf": csrf_of(client, "/services")})
    assert r.status_code == 302 and "DELETING" in client.get("/services").get_data(as_text=True)
    assert client.post("/services/web-toy/delete", data={}).status_code == 400     # no CSRF token


def test_a_deleted_service_says_deleting_until_the_controller_has_stopped_it(client, tokens, fake_backend, image,
                                                                             model_dir, engine, settings):
    """DELETE answers 202 at once; the service stays readable, saying DELETING (as documented),
    until the controller has cancelled its replicas and removed it; then 404."""
    from portal.api.openapi import openapi_document
    alice = bearer(tokens["alice"])
    assert client.post("/api/v1/services", headers=alice, json=body(image, model_dir)).status_code == 201
    controller = ServiceController(engine, fake_backend, settings)
    controller.cycle()
    assert client.delete("/api/v1/services/toy", headers=alice).status_code == 202
    shown = client.get("/api/v1/services/toy", headers=alice)
    assert shown.status_code == 200 and shown.get_json()["state"] == "DELETING"
    for _ in range(5):
        controller.cycle()
        for jid, st in list(fake_backend.jobs.items()):
            if any(c[0] == jid for c in fake_backend.cancelled):
                fake_backend.jobs[jid] = type(st)(jid, JobState.CANCELLED, "", user=st.user, comment=st.comment)
    assert client.get("/api/v1/services/toy", headers=alice).status_code == 404
    doc = openapi_document()
    assert "DELETING" in doc["paths"]["/services/{name}"]["delete"]["summary"]
    assert "DELETING" in doc["components"]["schemas"]["ServicePublic"]["properties"]["state"]["description"]

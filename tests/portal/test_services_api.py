"""Services through the Flask test client (no cluster): validation naming the field, users see
only their own services, scale/update/delete, the router's errors, the Services page."""
from __future__ import annotations

import pytest
from sqlmodel import Session, select

from portal.models import Service
from portal.services.inference import ServiceController
from tests.portal.conftest import bearer, csrf_of, login



@pytest.fixture
def model_dir(settings):
    import shutil
    from pathlib import Path
    d = Path(settings.shared_root) / "users" / "alice" / "toy"
    shutil.copytree(Path(__file__).resolve().parents[1] / "inference" / "toy_model", d)
    for p in [d, *d.iterdir()]:
        shutil.chown(p, "alice", "alice")
    return str(d)


@pytest.fixture
def image(base_image):
    return str(base_image)


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


def test_router_errors_without_a_cluster(client, tokens, fake_backend, image, model_dir):
    assert client.post("/api/v1/services", headers=bearer(tokens["alice"]), json=body(image, model_dir)).status_code == 201
    r = client.post("/service/toy", data=b"x")
    assert r.status_code == 401 and "Bearer" in r.get_json()["message"]
    r = client.post("/service/toy", data=b"x", headers=bearer(tokens["bob"]))
    assert r.status_code == 404 and r.get_json()["error"] == "unknown_service"
    r = client.post("/service/nope", data=b"x", headers=bearer(tokens["alice"]))
    assert r.status_code == 404
    r = client.post("/service/toy", data=b"x", headers=bearer(tokens["alice"]))
    assert r.status_code == 503 and "no ready replica" in r.get_json()["message"] and r.headers["Retry-After"]
    r = client.post("/service/toy", data=b"x" * (16 * 1024 * 1024 + 1), headers=bearer(tokens["alice"]))
    assert r.status_code == 413
    assert client.get("/service/toy", headers=bearer(tokens["alice"])).status_code == 405


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

"""The create and public models: one parse for the form, the API, the CLI and the script; the
form's text round-trips; reasons in words; the OpenAPI document generated from the models."""
import datetime as dt

import pytest

from portal.errors import ValidationError
from portal.models import Job
from portal.models.common import parse
from portal.models.jobs import JobCreate, JobPublic, reason_sentence
from slurm.states import JobState

BASE = {"image": "/i.sif", "node_type": "1card", "command": "python3 train.py --lr 0.1"}


def test_form_text_and_json_give_the_same_model():
    from_json = parse(JobCreate, {**BASE, "command": ["python3", "train.py", "--lr", "0.1"], "env": {"A": "1"},
                                  "inputs": ["/a", "/b"], "sweep": {"LR": [0.1, 0.01]}, "gpus": 1})
    from_form = parse(JobCreate, {**BASE, "env": "A=1\n", "inputs": "/a\n/b\n", "sweep": "LR=0.1,0.01", "gpus": "1",
                                  "output": "", "project": ""})
    assert from_json == from_form
    assert parse(JobCreate, from_form.as_form()) == from_form


def test_defaults_fill_empty_fields():
    job = parse(JobCreate, {**BASE, "name": "", "time_limit": " ", "output": "", "gpus": ""})
    assert (job.name, job.time_limit, job.output, job.gpus) == ("train", "01:00:00", None, None)


def test_every_invalid_field_is_reported_at_once():
    with pytest.raises(ValidationError) as e:
        parse(JobCreate, {"image": 1, "node_type": "", "command": [], "colour": "red", "gpus": "many",
                          "env": "NOEQUALS", "sweep": "LR"})
    assert e.value.errors == {
        "body": "unknown fields colour", "image": "must be a string",
        "node_type": "choose a node type (1card or 4card)",
        "command": "give the command to run in the image, e.g. python3 train.py",
        "gpus": "a whole number of GPUs, 0 or more", "env": "write one NAME=VALUE per line (got 'NOEQUALS')",
        "sweep": "write one NAME=V1,V2,... per line (got 'LR')"}


@pytest.mark.parametrize("body", [[1, 2], "text", None])
def test_a_body_that_is_not_an_object_is_refused(body):
    with pytest.raises(ValidationError, match="send a JSON object"):
        parse(JobCreate, body)


@pytest.mark.parametrize("state, reason, text, category", [
    (JobState.PENDING, "Resources", "waiting for a free node of this type [Resources]", "resources"),
    (JobState.PENDING, "(AssocGrpGRES)", "your project is at its GPU limit: waits until running jobs free some "
                                        "GPUs [AssocGrpGRES]", "limit"),
    (JobState.PENDING, "ReqNodeNotAvail, UnavailableNodes:g1n1", "the nodes it needs are down, drained or "
     "reserved: waits until they are back [ReqNodeNotAvail: UnavailableNodes:g1n1]", "node"),
    (JobState.PENDING, "SomethingNew", "Slurm says: SomethingNew [SomethingNew]", "other"),
    (JobState.PENDING, "None", "", None),
    (JobState.PENDING, "", "", None),
    (JobState.FAILED, "submission failed: sbatch: error: x", "submission failed: sbatch: error: x", None),
    (JobState.FAILED, "NonZeroExitCode", "its command exited with a non-zero exit code: see its log "
                                         "[NonZeroExitCode]", "failure"),
    # a job the reconciler ended because a job it depends on failed (slurm.reasons.dependency_failed)
    (JobState.FAILED, "a job it depends on (655, its image conversion) ended without success: unexpected EOF",
     "a job it depends on (655, its image conversion) ended without success: unexpected EOF "
     "[DependencyNeverSatisfied]", "dependency"),
    (JobState.PENDING, "DependencyNeverSatisfied", "a job it depends on ended without success, so this job can "
     "never start: the portal cancels it; fix what failed and submit again [DependencyNeverSatisfied]",
     "dependency"),
])
def test_reasons_in_words(state, reason, text, category):
    assert reason_sentence(state, reason) == (text, category)


def test_public_job_carries_the_reason_in_words_and_iso_times():
    t = dt.datetime(2026, 12, 6, 5, 0, tzinfo=dt.timezone.utc)
    job = Job(id="j1", user_id=1, name="n", state=JobState.PENDING, reason="Priority", created_at=t,
              request_json=JobCreate(**BASE).model_dump_json())
    out = JobPublic.of(job, "alice").model_dump(mode="json")
    assert out["reason_text"] == "jobs with a higher priority are ahead of it in the queue [Priority]"
    assert out["created_at"] == "2026-12-06T05:00:00+00:00" and out["started_at"] is None
    assert out["request"]["command"] == ["python3", "train.py", "--lr", "0.1"]


def test_the_document_has_every_api_route_and_only_those(app):
    from portal.api import OPERATIONS
    from portal.api.openapi import openapi_document
    doc = openapi_document()
    documented = {(m.upper(), "/api/v1" + p) for p, ops in doc["paths"].items() for m in ops}
    routes = {(m, "/api/v1" + op.path) for op in OPERATIONS for m in [op.method]}
    flask = {(m, r.rule) for r in app.url_map.iter_rules() if r.rule.startswith("/api/v1")
             for m in r.methods - {"HEAD", "OPTIONS"}}
    as_paths = {(m, __import__("re").sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", r)) for m, r in flask}
    assert documented == routes == as_paths
    # bodies and answers are the models' own schemas
    post = doc["paths"]["/jobs"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobCreate"}
    assert set(doc["components"]["schemas"]["JobCreate"]["properties"]) == set(JobCreate.model_fields)
    assert doc["paths"]["/openapi.json"]["get"]["security"] == []


def test_a_job_without_a_request_cannot_be_reused():
    external = Job(id="e1", user_id=1, name="x", external=True, request_json='{"stdout": "/x/slurm-%j.out"}')
    with pytest.raises(ValidationError, match="submitted with plain sbatch"):
        JobCreate.of_job(external)
    broken = Job(id="b1", user_id=1, name="x", request_json='{"image": 5}')
    with pytest.raises(ValidationError) as e:
        JobCreate.of_job(broken)
    assert set(e.value.errors) >= {"image", "node_type", "command"}


@pytest.mark.parametrize("gpus", ["²", "1.5", True, "-1", [1]])
def test_gpus_must_be_a_whole_number(gpus):
    with pytest.raises(ValidationError) as e:
        parse(JobCreate, {**BASE, "gpus": gpus})
    assert e.value.errors == {"gpus": "a whole number of GPUs, 0 or more"}


def test_data_source_numbers_refuse_booleans_and_keys_are_required():
    from portal.models.datasources import DataSourceCreate
    with pytest.raises(ValidationError) as e:
        parse(DataSourceCreate, {"name": "s", "bandwidth_mbps": True, "workers": False})
    assert set(e.value.errors) == {"endpoint", "access_key", "secret_key", "bandwidth_mbps", "workers"}
    assert e.value.errors["endpoint"] == "is required"


def test_a_long_token_name_is_cut_not_refused():
    from portal.models.accounts import TokenCreate
    assert parse(TokenCreate, {"name": "x" * 100}).name == "x" * 64


def test_timestamps_are_documented_as_date_times():
    import portal.api  # noqa: F401 (registers every view)
    from portal.api.openapi import openapi_document
    job = openapi_document()["components"]["schemas"]["JobPublic"]["properties"]
    assert (job["created_at"]["type"], job["created_at"]["format"]) == ("string", "date-time")
    assert (job["started_at"]["type"], job["started_at"]["format"]) == (["string", "null"], "date-time")

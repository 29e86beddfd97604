"""Shared-filesystem inputs bound read-only at /data/data/NAME (the default) or copied (stage
copy): how a submission splits its inputs, what the batch script then says, and what the
create model takes. The real job is in tests/portal/test_bind_inputs_live.py."""
from __future__ import annotations

import pytest

from portal.errors import ValidationError
from portal.models.common import parse
from portal.models.jobs import JobCreate
from portal.services.submit import Submission, build_spec, split_inputs
from slurm.render import render_sbatch


def test_shared_paths_are_bound_and_s3_locations_staged():
    staged, bound = split_inputs(["s3://src/b/p", "/shared/datasets/imagenet", "/shared/u/alice/code/"], "bind")
    assert staged == ["s3://src/b/p"]
    assert bound == [("/shared/datasets/imagenet", "/data/data/imagenet"), ("/shared/u/alice/code", "/data/data/code")]
    assert split_inputs(["/shared/a", "s3://x/y"], "copy") == (["/shared/a", "s3://x/y"], [])


@pytest.mark.parametrize("inputs, message", [
    (["/shared/a/data", "/shared/b/data"], "would both be bound at /data/data/data"),
    (["/shared/a:b"], "which a bind cannot carry"),
    (["/"], "the filesystem's root cannot be bound"),
])
def test_inputs_a_bind_cannot_take_are_refused_naming_the_way_out(inputs, message):
    with pytest.raises(ValidationError) as err:
        split_inputs(inputs, "bind")
    assert err.value.field == "inputs" and message in str(err.value)
    assert split_inputs(inputs, "copy") == (inputs, [])      # copying takes them


def test_the_script_binds_read_only_and_copies_nothing(settings):
    job = parse(JobCreate, {"image": "/i.sif", "node_type": "1card", "command": "python3 /data/data/code/t.py",
                            "inputs": ["%s/datasets/big" % settings.shared_root]})
    assert job.stage == "bind"
    script = render_sbatch(build_spec(settings, job, Submission(user="alice")))
    assert "--bind %s/datasets/big:/data/data/big:ro" % settings.shared_root in script
    assert "stage in --from %s/datasets/big" % settings.shared_root not in script
    assert "input: %s/datasets/big bound read-only at /data/data/big" % settings.shared_root in script
    copied = parse(JobCreate, {**job.model_dump(), "stage": "copy"})
    script = render_sbatch(build_spec(settings, copied, Submission(user="alice")))
    assert "stage in --from %s/datasets/big" % settings.shared_root in script and ":/data/data/big:ro" not in script


@pytest.mark.parametrize("value, want", [(None, "bind"), ("", "bind"), ("copy", "copy"), ("bind", "bind")])
def test_stage_defaults_to_bind(value, want):
    body = {"image": "/i.sif", "node_type": "1card", "command": "true"}
    if value is not None:
        body["stage"] = value
    assert parse(JobCreate, body).stage == want


def test_an_unknown_stage_names_the_field():
    with pytest.raises(ValidationError) as err:
        parse(JobCreate, {"image": "/i.sif", "node_type": "1card", "command": "true", "stage": "link"})
    assert "stage" in err.value.errors and "bind" in err.value.errors["stage"]


def test_a_job_stored_before_stage_existed_is_resubmitted_as_it_ran():
    """Its shared inputs were copied into /data/data: resubmitting it copies them again."""
    import json
    from portal.models import Job
    old = Job(id="j", user_id=1, name="old", request_json=json.dumps(
        {"image": "/i.sif", "node_type": "1card", "command": ["true"], "inputs": ["/shared/d"]}))
    assert JobCreate.of_job(old).stage == "copy"
    new = Job(id="k", user_id=1, name="new", request_json=json.dumps(
        {"image": "/i.sif", "node_type": "1card", "command": ["true"], "inputs": ["/shared/d"], "stage": "bind"}))
    assert JobCreate.of_job(new).stage == "bind"

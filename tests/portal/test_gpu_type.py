"""A GPU model a user asks for: written into the request (--gres=gpu:MODEL:N) only then, checked
against the node type's models (site.toml gpu_type, comma-separated where a partition mixes
them), refused naming the field otherwise."""
from __future__ import annotations

from dataclasses import replace

import pytest

from portal.errors import ValidationError
from portal.models.common import parse
from portal.models.jobs import JobCreate
from portal.services.submit import Submission, build_spec
from slurm.render import render_sbatch

BODY = {"image": "/i.sif", "node_type": "4card", "command": "true"}


def test_no_model_asked_takes_any_gpu_of_the_partition(settings):
    script = render_sbatch(build_spec(settings, parse(JobCreate, BODY), Submission(user="alice")))
    assert "#SBATCH --gres=gpu:4\n" in script


def test_a_model_of_the_node_type_is_written_into_the_request(settings):
    job = parse(JobCreate, {**BODY, "gpu_type": "p40"})
    assert "#SBATCH --gres=gpu:p40:4\n" in render_sbatch(build_spec(settings, job, Submission(user="alice")))


def test_a_mixed_partition_takes_each_of_its_models(settings):
    mixed = replace(settings.node_types["4card"], gpu_type="p40, v100")
    settings = replace(settings, node_types={**settings.node_types, "4card": mixed})
    job = parse(JobCreate, {**BODY, "gpu_type": "v100", "gpus": 2})
    assert "#SBATCH --gres=gpu:v100:2\n" in render_sbatch(build_spec(settings, job, Submission(user="alice")))


@pytest.mark.parametrize("model, message", [("a100", "node type 4card has p40 GPUs"),
                                            ("p40;rm", "a GPU model name")])
def test_another_model_is_refused_naming_the_field(settings, model, message):
    with pytest.raises(ValidationError) as err:
        build_spec(settings, parse(JobCreate, {**BODY, "gpu_type": model}), Submission(user="alice"))
    assert message in str(err.value) or message in str(err.value.errors)
    assert "gpu_type" in (err.value.errors or {err.value.field: ""})

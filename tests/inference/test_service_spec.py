"""A service's spec and its replica's batch job: pure."""
from __future__ import annotations

import subprocess

import pytest

from inference.endpoints import parse_endpoint
from inference.errors import EndpointError, ServiceSpecError
from inference.service import ScalePolicy, ServiceSpec, check_name, replica_job, runtime_config
from slurm.render import render_sbatch
from slurm.spec import NodeType

INFER = NodeType("infer", "infer", 1, "p40", 8, 32000)


def test_replica_job_runs_the_runtime_unlimited_on_infer_with_the_runtime_read_only():
    spec = ServiceSpec(image="/s/img.sif", model="s3://lab/models/x y", version="2", gpus=1)
    job = replica_job(spec, INFER, service="toy", replica_id="r" * 36, job_dir="/s/svc/replicas/r 1",
                      runtime_path="/s/svc/runtime.py")
    script = render_sbatch(job)
    for line in ("#SBATCH --partition=infer", "#SBATCH --time=UNLIMITED", "#SBATCH --no-requeue",
                 "#SBATCH --gres=gpu:p40:1", "#SBATCH --mem=2000M", "#SBATCH --comment=aiportal:service:" + "r" * 36,
                 "--bind /s/svc/runtime.py:/aiportal/runtime.py:ro", "--bind '/s/svc/replicas/r 1/run:/aiportal/run:rw'",
                 " --nv --pwd /data/output ",
                 "python3 /aiportal/runtime.py --config /aiportal/run/runtime.json",
                 "stage in --from 's3://lab/models/x y'"):
        assert line in script, line
    assert "--signal" not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    cfg = runtime_config(spec, bind_host="0.0.0.0")
    assert cfg["model_file"] == "/data/data/model.py" and cfg["endpoint_file"] == "/aiportal/run/endpoint.json"
    assert cfg["port_range"] == [7000, 7999] and cfg["version"] == "2" and cfg["key"] is None
    # the runtime takes what the portal writes, with the service's key or without one
    from inference.runtime import load_config
    assert load_config(cfg)["key"] is None
    assert load_config(runtime_config(spec, key="k" * 43))["key"] == "k" * 43


@pytest.mark.parametrize("kw, field", [
    ({"image": "img.sif"}, "image"), ({"image": "/x.tar"}, "image"), ({"model": " "}, "model"),
    ({"model_file": "/abs.py"}, "model_file"), ({"model_file": "a/../../b.py"}, "model_file"),
    ({"model_file": "m.txt"}, "model_file"), ({"class_name": "1x"}, "class_name"), ({"version": ""}, "version"),
    ({"gpus": -1}, "gpus"), ({"gpus": True}, "gpus"), ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_wait_ms": -1}, "max_wait_ms"), ({"memory_mb": 10}, "memory_mb"),
])
def test_spec_errors_name_the_field(kw, field):
    with pytest.raises(ServiceSpecError) as e:
        ServiceSpec(**{"image": "/i.sif", "model": "/m", **kw})
    assert e.value.field == field


def test_more_gpus_than_the_node_type_has_is_refused():
    with pytest.raises(ServiceSpecError, match="1 GPU"):
        replica_job(ServiceSpec(image="/i.sif", model="/m", gpus=2), INFER, service="s", replica_id="x",
                    job_dir="/j", runtime_path="/r")


@pytest.mark.parametrize("kw, field", [({"min_replicas": 3, "max_replicas": 2}, "max_replicas"),
                                       ({"max_replicas": 0, "min_replicas": 0}, "max_replicas"),
                                       ({"min_replicas": -1}, "min_replicas"),
                                       ({"target_inflight": 0}, "target_inflight")])
def test_policy_errors(kw, field):
    with pytest.raises(ServiceSpecError) as e:
        ScalePolicy(**kw)
    assert e.value.field == field


@pytest.mark.parametrize("name, ok", [("toy", True), ("a-1", True), ("a", True), ("-a", False), ("a-", False),
                                      ("A", False), ("a_b", False), ("a" * 48, True), ("a" * 49, False), ("", False)])
def test_names_are_url_safe(name, ok):
    if ok:
        assert check_name(name) == name
    else:
        with pytest.raises(ServiceSpecError):
            check_name(name)


@pytest.mark.parametrize("text, ok", [
    ('{"host": "inf1", "port": 7001, "version": "1", "job_id": "12"}', True),
    ('{"host": "inf1", "port": 0}', False), ('{"host": "", "port": 7001}', False),
    ('{"host": "a b", "port": 7001}', False), ('{"host": "inf1", "port": true}', False), ('[1]', False), ('{', False),
])
def test_endpoint_files(text, ok):
    if ok:
        ep = parse_endpoint(text)
        assert (ep.url, ep.version, ep.job_id) == ("http://inf1:7001", "1", "12")
    else:
        with pytest.raises(EndpointError):
            parse_endpoint(text)

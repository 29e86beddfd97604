"""The Ansible side: the example site's rendered Slurm files, and the dev playbook's idempotency."""
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

ANSIBLE = REPO / "ansible"
PLAYBOOK = str(REPO / ".venv" / "bin" / "ansible-playbook")


def ansible_playbook(*args, timeout=600):
    env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    return subprocess.run([PLAYBOOK, *args], capture_output=True, text=True, cwd=ANSIBLE,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def example_cluster(tmp_path_factory):
    out = tmp_path_factory.mktemp("render")
    res = ansible_playbook("-i", "inventories/example-cluster", "render-config.yml",
                           "-e", "aiportal_render_dir=%s" % out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {name: (out / name).read_text() for name in ("slurm.conf", "gres.conf", "cgroup.conf", "slurmdbd.conf")}


def lines(text, prefix):
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_example_cluster_node_lines(example_cluster):
    assert lines(example_cluster["slurm.conf"], "NodeName=") == [
        "NodeName=g1n[01-08] CPUs=32 RealMemory=190000 Gres=gpu:p40:1 State=UNKNOWN",
        "NodeName=g4n[01-04] CPUs=48 RealMemory=256000 Gres=gpu:p40:4 State=UNKNOWN",
        "NodeName=inf[01-02] CPUs=16 RealMemory=64000 Gres=gpu:p40:1 State=UNKNOWN",
    ]


def test_example_cluster_partitions(example_cluster):
    assert lines(example_cluster["slurm.conf"], "PartitionName=") == [
        "PartitionName=gpu-1card Nodes=g1n[01-08] Default=YES MaxTime=7-00:00:00 DefaultTime=01:00:00 State=UP",
        "PartitionName=gpu-4card Nodes=g4n[01-04] MaxTime=7-00:00:00 DefaultTime=01:00:00 State=UP",
        "PartitionName=infer Nodes=inf[01-02] MaxTime=UNLIMITED DefaultTime=UNLIMITED State=UP",
    ]


def test_example_cluster_is_a_real_site(example_cluster):
    conf = example_cluster["slurm.conf"]
    for expected in ("SlurmctldHost=ctl01(10.20.0.10)", "ProctrackType=proctrack/cgroup",
                     "TaskPlugin=task/cgroup,task/affinity", "SlurmdPort=6818", "SlurmUser=slurm",
                     "AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=ctl01",
                     "SlurmdSpoolDir=/var/spool/slurmd", "JobRequeue=1", "GresTypes=gpu"):
        assert expected in conf.splitlines(), expected
    for dev_only in ("config_overrides", "NodeAddr=127.0.0.1", "proctrack/linuxproc", "Port=682"):
        assert dev_only not in conf
    assert "ConstrainDevices=yes" in example_cluster["cgroup.conf"]
    assert "StoragePass=<secret" in example_cluster["slurmdbd.conf"]


def test_example_cluster_gres(example_cluster):
    assert lines(example_cluster["gres.conf"], "NodeName=") == [
        "NodeName=g1n[01-08] Name=gpu Type=p40 File=/dev/nvidia0",
        "NodeName=g4n[01-04] Name=gpu Type=p40 File=/dev/nvidia[0-3]",
        "NodeName=inf[01-02] Name=gpu Type=p40 File=/dev/nvidia0",
    ]


def test_example_cluster_runs_the_health_check(example_cluster):
    conf = example_cluster["slurm.conf"].splitlines()
    for expected in ("HealthCheckProgram=/opt/aiportal/venv/bin/aiportal-healthcheck", "HealthCheckInterval=30",
                     "HealthCheckNodeState=ANY"):
        assert expected in conf, expected


def test_a_node_type_without_a_partition_fails_with_a_message(tmp_path):
    res = ansible_playbook("-i", "inventories/example-cluster", "render-config.yml",
                           "-e", "aiportal_render_dir=%s" % tmp_path,
                           "-e", '{"aiportal_node_groups": {"8card": "gpu_8card"}}')
    assert res.returncode != 0
    assert "'8card' is not in aiportal_node_types" in res.stdout + res.stderr


@pytest.mark.slurm
def test_dev_render_matches_the_installed_files(tmp_path):
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "slurm-client"],
                             capture_output=True, text=True, check=True).stdout
    res = ansible_playbook("-i", "inventories/dev", "render-config.yml",
                           "-e", "aiportal_render_dir=%s" % tmp_path, "-e", "aiportal_slurm_version=%s" % version)
    assert res.returncode == 0, res.stdout[-3000:]
    for name in ("slurm.conf", "gres.conf", "cgroup.conf"):
        assert (tmp_path / name).read_text() == (Path("/etc/slurm") / name).read_text(), name


@pytest.mark.ansible
@pytest.mark.slurm
def test_second_run_of_the_dev_playbook_changes_nothing():
    res = ansible_playbook("-i", "inventories/dev", "site.yml")
    assert res.returncode == 0, res.stdout[-4000:]
    recap = re.search(r"^dev\s+:\s+ok=\d+\s+changed=(\d+)", res.stdout, re.M)
    assert recap, res.stdout[-2000:]
    assert recap.group(1) == "0", "tasks that changed:\n%s" % "\n".join(
        t for t in re.findall(r"TASK \[(.+?)\] \*+\nchanged", res.stdout))

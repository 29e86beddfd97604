"""sbatch rendering: golden files for typical specs, validation, and hostile values pushed
through rendering and executed by a real bash, proving nothing is injected."""
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from containers.apptainer import job_exec_prefix
from slurm.errors import SpecError
from slurm.render import render_command_job, render_sbatch, sbatch_flag, sbatch_header, shell_word
from slurm.spec import JOB_DATA_DIR, JOB_OUTPUT_DIR, JobSpec, NodeType, ScriptDir
from slurm.sweep import array_specs, expand_grid

GOLDEN = Path(__file__).parent / "golden"
FOUR = NodeType("4card", "gpu-4card", 4, "p40", 48, 256000)
ONE = NodeType("1card", "gpu-1card", 1, "p40", 8, 32000)


def container(nv=False, **kw):
    """What the portal passes: the containers builder's argv, binding the script's folders."""
    return job_exec_prefix(JOB_DATA_DIR, JOB_OUTPUT_DIR, nv=nv, **kw)


SPECS = {
    "train-4card": lambda: JobSpec.for_node_type(
        FOUR, name="cifar10", image="/shared/images/cache/ab/abcdef.sif",
        command=["python3", "/code/train.py", "--max_steps", "1000"], job_dir="/shared/users/alice/jobs/j1",
        inputs=["/shared/datasets/cifar10"], output="/shared/users/alice/outputs/j1", time_limit="02:00:00",
        env={"TF_CPP_MIN_LOG_LEVEL": "2"}, portal_id="6f1c2b9e-0000-4000-8000-000000000001",
        container=container(nv=True)),
    "minimal-1card": lambda: JobSpec.for_node_type(
        ONE, name="hello", image="/shared/images/x.sif", command=["echo", "hi"], job_dir="/shared/jobs/h",
        checkpoint_signal=None, requeue=False, container=container(nv=True)),
    "sweep": lambda: array_specs(JobSpec.for_node_type(
        ONE, name="sweep", image="/shared/images/x.sif", command=["python3", "train.py"],
        job_dir="/shared/jobs/s", output="/shared/out/s", account="proj1", qos="normal",
        container=container(nv=True, binds=[("/shared/code", "/code", "ro")])),
        {"LR": ["0.1", "0.01"], "BATCH": [32, 64]}, max_array_size=1000, max_parallel=2)[0],
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_golden(name):
    text = render_sbatch(SPECS[name]())
    path = GOLDEN / ("%s.sbatch" % name)
    if os.environ.get("AIPORTAL_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), "rendering changed; review, then AIPORTAL_UPDATE_GOLDEN=1 to accept"


def test_rendered_scripts_are_valid_bash(tmp_path):
    for name, make in SPECS.items():
        script = tmp_path / name
        script.write_text(render_sbatch(make()))
        res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, (name, res.stderr)


@pytest.mark.parametrize("name, value, expected", [
    ("job-name", "a b", "#SBATCH --job-name='a b'"),
    ("requeue", None, "#SBATCH --requeue"),
    ("comment", "aiportal:x", "#SBATCH --comment=aiportal:x"),
    ("output", "/p/it's", "#SBATCH --output='/p/it'\"'\"'s'"),
])
def test_sbatch_flag_quotes(name, value, expected):
    assert sbatch_flag(name, value) == expected


BASE = dict(name="ok", partition="gpu-1card", image="/i.sif", command=["true"], job_dir="/j", container=container())


@pytest.mark.parametrize("field, value, message", [
    ("name", "a b", "name 'a b': use 1-128 letters"),
    ("name", "x;rm", "name 'x;rm'"),
    ("command", "echo hi", "give the command as a list"),
    ("command", [], "give at least the program"),
    ("image", "rel.sif", "must be an absolute path"),
    ("job_dir", "/a:b", "without newlines, ':' or ','"),
    ("job_dir", "/a\nb", "without newlines"),
    ("time_limit", "forever", "use minutes, HH:MM:SS"),
    ("env", {"1X": "y"}, "variable names are letters"),
    ("env", {"PATH": "/evil"}, "is set by aiportal or Slurm"),
    ("env", {"SLURM_JOB_ID": "1"}, "is set by aiportal or Slurm"),
    ("checkpoint_signal", "KILL@10", "use e.g. B:USR1@120"),
    ("dependency", "afterok:1;ls", "use e.g. afterok:1234"),
    ("array", "0-9; ls", "use e.g. 0-99"),
    ("account", "a b", "contains characters"),
    ("gpus", -1, "need gpus >= 0"),
    ("inputs", ["/a\nb"], "cannot be empty or contain newlines"),
    ("container", (), "build it with containers.apptainer.job_exec_prefix"),
    ("container", "apptainer exec", "build it with containers.apptainer.job_exec_prefix"),
    ("container", ("apptainer", ()), "an empty word"),
    ("container", ("apptainer", "a\0b"), "cannot contain NUL bytes"),
    ("container", ("apptainer", (ScriptDir("HOME"), ":/h")), "neither a string nor one of the script's folders"),
    ("container", ("apptainer", ("$out_dir", 1)), "neither a string nor one of the script's folders"),
])
def test_invalid_specs_name_the_field(field, value, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        JobSpec(**{**BASE, field: value})


def test_a_spec_needs_a_container_argv():
    kw = dict(BASE)
    del kw["container"]
    with pytest.raises(TypeError, match="container"):
        JobSpec(**kw)


@pytest.mark.parametrize("word, text", [
    ("a b", "'a b'"),
    ("--pwd", "--pwd"),
    ((JOB_OUTPUT_DIR, ":/data/output:rw"), '"$out_dir":/data/output:rw'),
    ((JOB_DATA_DIR, ":/it's here:rw"), '"$data_dir"\':/it\'"\'"\'s here:rw\''),
])
def test_shell_word(word, text):
    assert shell_word(word) == text


def test_shell_word_refuses_a_variable_the_script_does_not_define():
    with pytest.raises(SpecError, match=r"does not define \$HOME"):
        shell_word((ScriptDir("HOME"),))


def test_the_run_line_is_the_containers_argv_then_image_and_command():
    spec = JobSpec(**{**BASE, "command": ["python3", "it's.py"]})
    run = [line for line in render_sbatch(spec).splitlines() if line.endswith(" &") and "apptainer" in line]
    assert run == ['apptainer exec --no-eval --no-mount cwd --pwd /data/output --bind "$data_dir":/data/data:rw '
                   '--bind "$out_dir":/data/output:rw /i.sif python3 \'it\'"\'"\'s.py\' &']


def test_command_job_validates_and_quotes():
    text = render_command_job("conv", "p", ["apptainer", "build", "/c/a b.sif"], "/l/x.log")
    assert text.endswith("exec apptainer build '/c/a b.sif'\n")
    with pytest.raises(SpecError, match="give the command as a list"):
        render_command_job("conv", "p", "apptainer build", "/l/x.log")
    with pytest.raises(SpecError, match="name 'a b'"):
        render_command_job("a b", "p", ["true"], "/l/x.log")


def test_for_node_type_refuses_more_gpus_than_a_node_has():
    with pytest.raises(SpecError, match="node type 1card has 1 GPUs per node"):
        JobSpec.for_node_type(ONE, name="x", image="/i.sif", command=["true"], job_dir="/j", gpus=2,
                              container=container())


@pytest.mark.parametrize("node, gpus, cpus, memory_mb", [
    (FOUR, None, 48, 256000), (FOUR, 2, 24, 128000), (FOUR, 1, 12, 64000), (ONE, None, 8, 32000), (FOUR, 0, 1, None)])
def test_for_node_type_gives_the_cpus_and_memory_that_come_with_the_gpus(node, gpus, cpus, memory_mb):
    """The node's shape per GPU (4card: 12 CPUs and 64 GB a GPU), not a whole node for one GPU."""
    kw = dict(name="x", image="/i.sif", command=["t"], job_dir="/j", container=container())
    if gpus is not None:
        kw["gpus"] = gpus
    spec = JobSpec.for_node_type(node, **kw)
    assert (spec.cpus, spec.memory_mb) == (cpus, memory_mb)
    header = "\n".join(sbatch_header(spec))
    assert "--cpus-per-task=%d" % cpus in header
    assert ("--mem=%dM" % memory_mb in header) if memory_mb else "--mem" not in header


def test_the_gpu_model_is_asked_for_only_where_the_site_pins_it():
    """Sites have mixed GPU models: a job takes any GPU of its partition unless the node type
    pins its model (pin_gpu_type) or the caller names one."""
    kw = dict(name="x", image="/i.sif", command=["t"], job_dir="/j", container=container())
    assert "#SBATCH --gres=gpu:4" in sbatch_header(JobSpec.for_node_type(FOUR, **kw))
    pinned = NodeType("4card", "gpu-4card", 4, "a100", 48, 256000, pin_gpu_type=True)
    assert "#SBATCH --gres=gpu:a100:4" in sbatch_header(JobSpec.for_node_type(pinned, **kw))
    assert "#SBATCH --gres=gpu:v100:4" in sbatch_header(JobSpec.for_node_type(FOUR, gpu_type="v100", **kw))


def test_expand_grid_order_and_split():
    assert expand_grid({"a": [1, 2], "b": ["x"]}) == [{"a": "1", "b": "x"}, {"a": "2", "b": "x"}]
    base = JobSpec(**BASE)
    specs = array_specs(base, {"i": list(range(7))}, max_array_size=3)
    assert [s.array for s in specs] == ["0-2", "0-2", "0-0"]
    assert [s.array_offset for s in specs] == [0, 3, 6]
    assert [s.name for s in specs] == ["ok.0", "ok.1", "ok.2"]
    assert specs[2].sweep == ((("i", "6"),),)


@pytest.mark.parametrize("grid", [{}, {"a": []}, {"a": "abc"}])
def test_bad_grids(grid):
    with pytest.raises(SpecError):
        expand_grid(grid)


HOSTILE = [
    "two words",
    "it's \"quoted\"",
    "'; touch INJECTED; '",
    "$(touch INJECTED)",
    "`touch INJECTED`",
    "line1\nline2",
    "ünïcödé ✓ 中文",
    "--bind=/etc:/x",
    "; exit 0",
    "${HOME}",
    "*",
    "",
]


@pytest.fixture
def recorder(tmp_path):
    """Stand-ins for `apptainer` and `aiportal` below the rendering boundary: they record the
    argv they get (JSON) and exit with $RECORD_RC."""
    rec = tmp_path / "record"
    rec.write_text("#!/usr/bin/env python3\nimport json, os, sys\n"
                   "with open(os.environ['RECORD_TO'], 'a') as f:\n"
                   "    f.write(json.dumps({'argv': sys.argv[1:], 'env': {k: v for k, v in os.environ.items() if k.startswith('H_')}}) + '\\n')\n"
                   "sys.exit(int(os.environ.get('RECORD_RC', '0')) if sys.argv[1] == 'exec' else 0)\n")
    rec.chmod(rec.stat().st_mode | stat.S_IXUSR)
    return rec


def run_script(tmp_path, spec, rc=0):
    script = tmp_path / "job.sh"
    script.write_text(render_sbatch(spec))
    record_to = tmp_path / "calls.jsonl"
    env = {"PATH": os.environ["PATH"], "RECORD_TO": str(record_to), "RECORD_RC": str(rc)}
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=30)
    calls = [json.loads(line) for line in record_to.read_text().splitlines()] if record_to.exists() else []
    return res, calls


def test_hostile_values_reach_the_program_verbatim_and_nothing_runs(tmp_path, recorder):
    job_dir = tmp_path / "job dir 'x' $(touch INJECTED)"
    spec = JobSpec(name="hostile", partition="gpu-1card", image=str(tmp_path / "img $(x).sif"),
                   command=["prog", *HOSTILE], job_dir=str(job_dir), inputs=[str(tmp_path / "in `x`")],
                   output=str(tmp_path / "out; touch INJECTED"),
                   env={"H_%d" % i: v for i, v in enumerate(HOSTILE)},
                   container=container(apptainer=str(recorder), binds=[(str(tmp_path / "ro 'x'"), "/ro", "ro")]),
                   stage_bin=str(recorder))
    (tmp_path / "in `x`").mkdir()
    res, calls = run_script(tmp_path, spec)
    assert res.returncode == 0, res.stderr
    assert not list(tmp_path.rglob("INJECTED")), "a value was executed as shell"
    stage_in, restore, run, stage_out = calls
    assert stage_in["argv"] == ["stage", "in", "--from", str(tmp_path / "in `x`"), "--to", str(job_dir / "data")]
    assert restore["argv"][-1] == "--missing-ok"
    assert run["argv"][:12] == ["exec", "--no-eval", "--no-mount", "cwd", "--pwd", "/data/output",
                                "--bind", "%s/data:/data/data:rw" % job_dir, "--bind", "%s/output:/data/output:rw" % job_dir,
                                "--bind", "%s/ro 'x':/ro:ro" % tmp_path]
    assert run["argv"][12:] == [spec.image, "prog", *HOSTILE]
    assert run["env"] == {"H_%d" % i: v for i, v in enumerate(HOSTILE)}
    assert stage_out["argv"] == ["stage", "out", "--from", str(job_dir / "output"), "--to", spec.output]


@pytest.mark.parametrize("rc", [0, 1, 42])
def test_exit_code_is_kept_and_stage_out_runs_on_failure(tmp_path, recorder, rc):
    spec = JobSpec(**{**BASE, "job_dir": str(tmp_path / "j"), "output": str(tmp_path / "o"),
                      "container": container(apptainer=str(recorder)), "stage_bin": str(recorder)})
    res, calls = run_script(tmp_path, spec, rc=rc)
    assert res.returncode == rc
    assert calls[-1]["argv"][:2] == ["stage", "out"]
    assert "command exited with %d" % rc in res.stderr


def test_stage_in_failure_stops_before_the_command(tmp_path):
    failing = tmp_path / "fail"
    failing.write_text("#!/bin/sh\nexit 1\n")
    failing.chmod(0o755)
    spec = JobSpec(**{**BASE, "job_dir": str(tmp_path / "j"), "inputs": ["/nowhere"],
                      "container": container(apptainer="/bin/false"), "stage_bin": str(failing)})
    res, _ = run_script(tmp_path, spec)
    assert res.returncode == 90
    assert "stage in failed" in res.stderr


def test_sweep_task_gets_its_parameters(tmp_path, recorder):
    base = JobSpec(**{**BASE, "job_dir": str(tmp_path / "j"), "output": str(tmp_path / "o"),
                      "container": container(apptainer=str(recorder)), "stage_bin": str(recorder)})
    spec = array_specs(base, {"H_LR": ["0.1", "it's $(x)"]}, max_array_size=10)[0]
    script = tmp_path / "job.sh"
    script.write_text(render_sbatch(spec))
    env = {"PATH": os.environ["PATH"], "RECORD_TO": str(tmp_path / "c.jsonl"), "SLURM_ARRAY_TASK_ID": "1"}
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode == 0, res.stderr
    run = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()][1]
    assert run["env"] == {"H_LR": "it's $(x)"}
    assert "%s/output/task-1:/data/output:rw" % (tmp_path / "j") in run["argv"]


def test_users_own_credentials_file_is_passed_by_path_and_kept():
    spec = JobSpec(name="t", partition="gpu-1card", image="/i.sif", command=("true",), job_dir="/j",
                   inputs=("s3://b/in",), output="s3://b/out", user_credentials="/home/a b/creds.json",
                   container=container())
    text = render_sbatch(spec)
    assert text.count("--credentials '/home/a b/creds.json'") == 3     # stage in, restore, stage out
    assert "rm -f" not in text


@pytest.mark.parametrize("path", ["relative.json", "/x\nrm -rf /"])
def test_users_credentials_file_must_be_an_absolute_path(path):
    with pytest.raises(SpecError, match="user_credentials"):
        JobSpec(name="t", partition="p", image="/i.sif", command=("true",), job_dir="/j", user_credentials=path,
                container=container())


@pytest.mark.parametrize("value, seconds", [
    ("90", 5400), ("2", 120), ("10:30", 630), ("01:00:00", 3600), ("1-2", 93600), ("1-02:30", 95400),
    ("2-00:00:05", 172805), ("UNLIMITED", None),
])
def test_time_limit_seconds(value, seconds):
    from slurm.spec import time_limit_seconds
    assert time_limit_seconds(value) == seconds


@pytest.mark.parametrize("time_limit, signal, sent", [
    ("01:00:00", "B:USR1@120", True),
    ("UNLIMITED", "B:USR1@120", True),
    ("6", "B:USR1@120", True),          # 360 s: the warning, Slurm's 60 s slack, and as much again
    ("5", "B:USR1@120", False),
    ("2", "B:USR1@120", False),         # would come as the job starts: its program killed by USR1 unrun
    ("4", "B:USR1", True),              # Slurm's default warning: 60 s
    ("3", "B:USR1", False),
])
def test_a_checkpoint_warning_is_asked_for_only_where_the_program_gets_to_run_first(time_limit, signal, sent):
    script = render_sbatch(JobSpec(**{**BASE, "time_limit": time_limit, "checkpoint_signal": signal}))
    assert ("#SBATCH --signal=%s\n" % signal in script) is sent
    assert ("--signal" in script) is sent

"""The apptainer argv builders: tables of exact argvs, then real runs that push hostile
arguments and environment values through apptainer and read them back inside the container."""
import json
import subprocess

import pytest

from containers.apptainer import (ZSTD_MKSQUASHFS_ARGS, bind_spec, build_argv, env_item, exec_argv,
                                  exec_prefix, health_probe_argv, instance_run_argv, job_exec_prefix,
                                  skopeo_copy_argv)

SIF = "/srv/img/x.sif"


@pytest.mark.parametrize("kwargs, expected", [
    ({}, ["apptainer", "exec", "--no-eval", "--cleanenv", SIF, "python3", "-V"]),
    ({"cleanenv": False}, ["apptainer", "exec", "--no-eval", SIF, "python3", "-V"]),
    ({"nv": True}, ["apptainer", "exec", "--no-eval", "--cleanenv", "--nv", SIF, "python3", "-V"]),
    ({"binds": [("/data/in", "/data/in", "ro"), ("/scratch/j1", "/data/out", "rw")]},
     ["apptainer", "exec", "--no-eval", "--cleanenv", "--bind", "/data/in:/data/in:ro",
      "--bind", "/scratch/j1:/data/out:rw", SIF, "python3", "-V"]),
    ({"env": {"A": "1", "LR": "--lr=0.1"}},
     ["apptainer", "exec", "--no-eval", "--cleanenv", "--env", "A=1", "--env", '"LR=--lr=0.1"',
      SIF, "python3", "-V"]),
    ({"pwd": "/data/out", "apptainer": "/opt/apptainer/bin/apptainer"},
     ["/opt/apptainer/bin/apptainer", "exec", "--no-eval", "--cleanenv", "--pwd", "/data/out",
      SIF, "python3", "-V"]),
])
def test_exec_argv(kwargs, expected):
    assert exec_argv(SIF, ["python3", "-V"], **kwargs) == expected
    assert exec_prefix(**kwargs) + [SIF, "python3", "-V"] == expected


def test_exec_prefix_isolation_flags():
    assert exec_prefix(contain=True, no_home=True, no_mount=("cwd", "tmp"), silent=True, pwd="/") == [
        "apptainer", "--silent", "exec", "--no-eval", "--cleanenv", "--contain", "--no-home",
        "--no-mount", "cwd,tmp", "--pwd", "/"]


#: a marker the job-script renderer owns (slurm.spec.JOB_OUTPUT_DIR in the portal): the builder
#: only places it
OUT = object()


@pytest.mark.parametrize("args, kwargs, expected", [
    (("/j/data", "/j/output"), {},
     ("apptainer", "exec", "--no-eval", "--no-mount", "cwd", "--pwd", "/data/output",
      "--bind", "/j/data:/data/data:rw", "--bind", "/j/output:/data/output:rw")),
    (("/j/data", OUT), {"nv": True, "apptainer": "/opt/a", "binds": [("/r", "/aiportal/run", "rw"),
                                                                      ("/rt.py", "/aiportal/runtime.py", "ro")]},
     ("/opt/a", "exec", "--no-eval", "--no-mount", "cwd", "--nv", "--pwd", "/data/output",
      "--bind", "/j/data:/data/data:rw", "--bind", (OUT, ":/data/output:rw"),
      "--bind", "/r:/aiportal/run:rw", "--bind", "/rt.py:/aiportal/runtime.py:ro")),
])
def test_job_exec_prefix(args, kwargs, expected):
    assert job_exec_prefix(*args, **kwargs) == expected


def test_health_probe_argv():
    assert health_probe_argv("/p/probe.sif", apptainer="/usr/bin/apptainer") == [
        "/usr/bin/apptainer", "--silent", "exec", "--no-eval", "--cleanenv", "--contain", "--no-home",
        "--pwd", "/", "/p/probe.sif", "/bin/true"]


def test_exec_argv_keeps_hostile_command_items_as_single_items():
    hostile = ["sh", "-c", "echo $(id)", "a'; touch /tmp/X; '", "--help", "", "\n"]
    argv = exec_argv(SIF, hostile)
    assert argv[-len(hostile):] == hostile
    assert argv.index(SIF) == len(argv) - len(hostile) - 1


def test_instance_run_argv():
    assert instance_run_argv(SIF, "svc-1.a_b", ["python3", "-m", "http.server"],
                             binds=[("/m", "/model", "ro")], nv=True, env={"PORT": "8080"}) == [
        "apptainer", "instance", "run", "--no-eval", "--cleanenv", "--bind", "/m:/model:ro",
        "--nv", "--env", "PORT=8080", SIF, "svc-1.a_b", "python3", "-m", "http.server"]
    assert instance_run_argv(SIF, "s", []) == [
        "apptainer", "instance", "run", "--no-eval", "--cleanenv", SIF, "s"]


@pytest.mark.parametrize("kwargs, expected", [
    ({}, ["apptainer", "build", "--force", "--mksquashfs-args", "-comp zstd -Xcompression-level 3",
          "/c/x.sif", "docker-archive:/a.tar"]),
    ({"zstd": False, "force": False}, ["apptainer", "build", "/c/x.sif", "docker-archive:/a.tar"]),
])
def test_build_argv(kwargs, expected):
    assert build_argv("/c/x.sif", "docker-archive:/a.tar", **kwargs) == expected
    assert ZSTD_MKSQUASHFS_ARGS == "-comp zstd -Xcompression-level 3"


def test_skopeo_copy_argv():
    assert skopeo_copy_argv("oci:/l:latest", "oci-archive:/t/i.tar") == [
        "skopeo", "copy", "-q", "oci:/l:latest", "oci-archive:/t/i.tar"]


@pytest.mark.parametrize("key, value, item", [
    ("A", "1", "A=1"),
    ("_x9", "", "_x9="),
    ("A", "x,y", "A=x,y"),
    ("A", "$(id)", "A=$(id)"),
    ("A", '"q', 'A="q'),
    ("A", "a=b", '"A=a=b"'),
    ("A", 'k="v",w', '"A=k=""v"",w"'),
    ("A", '=x"', '"A==x"""'),
    ("A", "l1\nl2", "A=l1\nl2"),
])
def test_env_item(key, value, item):
    assert env_item(key, value) == item


@pytest.mark.parametrize("key, value, fragment", [
    ("1A", "x", "environment variable name '1A' is not a shell identifier"),
    ("A-B", "x", "environment variable name 'A-B' is not a shell identifier"),
    ("", "x", "environment variable name '' is not a shell identifier"),
    ("A B", "x", "environment variable name 'A B' is not a shell identifier"),
    ("BASH_FUNC_f%%", "x", "environment variable name 'BASH_FUNC_f%%' is not a shell identifier"),
    ("A", 'ends"', "environment variable A: apptainer's --env strips a trailing double quote"),
    ("A", "a\r\nb", "environment variable A: apptainer turns CRLF into LF"),
    ("A", "a\0b", "environment variable A: value contains a NUL byte"),
    ("A", 3, "environment variable A: value 3 is not a string"),
])
def test_env_item_rejects(key, value, fragment):
    with pytest.raises(ValueError) as e:
        exec_argv(SIF, ["true"], env={key: value})
    assert fragment in str(e.value)


@pytest.mark.parametrize("call, fragment", [
    (lambda: bind_spec("data", "/d", "ro"), "bind source 'data' must be an absolute path"),
    (lambda: bind_spec("/a", "d", "ro"), "bind destination 'd' must be an absolute path"),
    (lambda: bind_spec("/a:b", "/d", "ro"), "bind source '/a:b' contains ':', ','"),
    (lambda: bind_spec("/a", "/d,/e", "ro"), "bind destination '/d,/e' contains ':', ','"),
    (lambda: bind_spec("/a", "/d", "rx"), "bind mode 'rx' is not one of ro, rw"),
    (lambda: exec_argv("x.sif", ["true"]), "image path 'x.sif' must be absolute"),
    (lambda: exec_argv(SIF, "python3 -V"), "command must be an argv list, not the string"),
    (lambda: exec_argv(SIF, []), "command is empty"),
    (lambda: exec_argv(SIF, ["a\0b"]), "command argument 'a\\x00b' contains a NUL byte"),
    (lambda: exec_argv(SIF, [1]), "command argument 1 is not a string"),
    (lambda: exec_argv(SIF, ["true"], pwd="rel"), "pwd 'rel' must be an absolute path"),
    (lambda: exec_prefix(no_mount=("cwd,tmp",)), "--no-mount item 'cwd,tmp' is not a mount name"),
    (lambda: exec_prefix(no_mount=("",)), "--no-mount item '' is not a mount name"),
    (lambda: job_exec_prefix("data", "/o"), "bind source 'data' must be an absolute path"),
    (lambda: job_exec_prefix("/d", None), "bind source None for /data/output is neither a path nor"),
    (lambda: job_exec_prefix("/d", "/o", binds=[("/a:b", "/x", "ro")]), "bind source '/a:b' contains"),
    (lambda: health_probe_argv("probe.sif"), "image path 'probe.sif' must be absolute"),
    (lambda: instance_run_argv(SIF, "-x", []), "instance name '-x' is not valid"),
    (lambda: instance_run_argv(SIF, "a b", []), "instance name 'a b' is not valid"),
    (lambda: instance_run_argv(SIF, "a/b", []), "instance name 'a/b' is not valid"),
    (lambda: instance_run_argv(SIF, "x" * 64, []), "is not valid"),
])
def test_argv_rejects(call, fragment):
    with pytest.raises(ValueError) as e:
        call()
    assert fragment in str(e.value)


# -- real runs ---------------------------------------------------------------------------------

HOSTILE_ARGS = [
    "a'; touch {marker}; '",
    'a"; touch {marker}; "',
    "$(touch {marker})",
    "`touch {marker}`",
    "${{HOME}}",
    "$(id)",
    "x\ny",
    "",
    " lead and trail ",
    "*",
    "--help",
    "-c",
    "; && || | > {marker}",
    "\\",
    "é ü 雪 🙂",
    "\t",
]

HOSTILE_ENV = {
    "QUOTE": "a'; touch {marker}; '",
    "SUBST": "$(touch {marker})",
    "TICK": "`touch {marker}`",
    "VAR": "${{HOME}}",
    "COMMA": 'x,y,"z',
    "EQUALS": "k=v,k2=\"v2\"",
    "NEWLINE": "l1\nl2",
    "UNICODE": "é ü 雪 🙂",
    "EMPTY": "",
    "BACKSLASH": "a\\b\\",
    "LEADQUOTE": '"quoted',
}

PRINT_ARGS = "import json, sys; print(json.dumps(sys.argv[1:]))"
PRINT_ENV = "import json, os, sys; print(json.dumps({k: os.environ.get(k) for k in sys.argv[1:]}))"


@pytest.mark.apptainer
def test_hostile_arguments_arrive_verbatim(base_sif, tmp_path):
    marker = tmp_path / "pwned"
    args = [a.format(marker=marker) for a in HOSTILE_ARGS]
    res = subprocess.run(exec_argv(base_sif, ["python3", "-c", PRINT_ARGS, *args]),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == args
    assert not marker.exists()


@pytest.mark.apptainer
def test_hostile_environment_values_arrive_verbatim(base_sif, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    env = {k: v.format(marker=marker) for k, v in HOSTILE_ENV.items()}
    monkeypatch.setenv("LEAK", "from-the-portal")
    res = subprocess.run(exec_argv(base_sif, ["python3", "-c", PRINT_ENV, *env, "LEAK"], env=env),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {**env, "LEAK": None}
    assert not marker.exists()


@pytest.mark.apptainer
def test_binds_and_pwd(base_sif, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    (src / "x.txt").write_text("input\n")
    code = ("import os\n"
            "print(os.getcwd(), open('/data/in/x.txt').read().strip())\n"
            "open('/data/out/y.txt', 'w').write('written')\n"
            "try:\n    open('/data/in/z.txt', 'w')\nexcept OSError as e:\n    print(e.errno)\n")
    argv = exec_argv(base_sif, ["python3", "-c", code],
                     binds=[(src, "/data/in", "ro"), (out, "/data/out", "rw")], pwd="/data/out")
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["/data/out", "input", "30"]  # 30: EROFS
    assert (out / "y.txt").read_text() == "written"
    assert not (src / "z.txt").exists()


@pytest.mark.apptainer
def test_a_jobs_argv_starts_in_its_output_folder_without_a_warning(base_sif, tmp_path):
    """The job's working directory (the job folder) is not in the container; --pwd keeps
    apptainer from warning "Error changing the container working directory" and falling back
    to $HOME, and the program finds its data and writes its outputs by relative path."""
    job = tmp_path / "job 'dir'"
    for d in ("data", "output"):
        (job / d).mkdir(parents=True)
    (job / "data" / "in.txt").write_text("input\n")
    code = "import os; print(os.getcwd()); open('out.txt', 'w').write(open('../data/in.txt').read())"
    argv = [*job_exec_prefix(job / "data", job / "output"), base_sif, "python3", "-c", code]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=job)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "/data/output\n"
    assert "working directory" not in res.stderr, res.stderr
    assert (job / "output" / "out.txt").read_text() == "input\n"


@pytest.mark.apptainer
def test_health_probe_runs(base_sif, tmp_path):
    res = subprocess.run(health_probe_argv(base_sif), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0 and res.stderr == "", res.stderr

"""`aiportal image convert` and who runs it: root converts as the image builder account (the
argv and environment it uses for that), the builder account converts, anyone else is refused
with the command to run instead; refusals name the input and the fix."""
import os
import pwd
import subprocess

import pytest

from portal.cli.convert import builder_env, convert_argv
from tests.conftest import REPO

AIPORTAL = str(REPO / ".venv" / "bin" / "aiportal")
BUILDER = pwd.struct_passwd(("aiportal-img", "x", 999, 995, "", "/var/lib/aiportal/aiportal-img", "/bin/bash"))


def test_the_builders_environment_keeps_settings_and_drops_roots_own():
    env = builder_env({"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "AIPORTAL_IMAGE_CACHE": "/c",
                       "SLURM_CONF": "/etc/slurm/slurm.conf", "HOME": "/root", "USER": "root", "LOGNAME": "root",
                       "APPTAINER_CACHEDIR": "/root/.apptainer", "APPTAINER_DROP_CAPS": "CAP_SYS_RESOURCE",
                       "SINGULARITY_TMPDIR": "/root/tmp", "TMPDIR": "/root/tmp", "XDG_RUNTIME_DIR": "/run/user/0",
                       "SUDO_USER": "admin", "PWD": "/root"}, BUILDER)
    assert env == {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "AIPORTAL_IMAGE_CACHE": "/c",
                   "SLURM_CONF": "/etc/slurm/slurm.conf", "HOME": "/var/lib/aiportal/aiportal-img",
                   "USER": "aiportal-img", "LOGNAME": "aiportal-img", "SHELL": "/bin/sh"}


@pytest.mark.parametrize("kw, tail", [
    ({}, []),
    ({"cache": "/c"}, ["--cache", "/c"]),
    ({"authfile": "/tmp/aiportal-auth-x/auth.json"}, ["--authfile", "/tmp/aiportal-auth-x/auth.json"]),
    ({"as_digest": "sha256:" + "ab" * 32}, ["--as-digest", "sha256:" + "ab" * 32]),
])
def test_the_builders_command_is_an_argv_list(kw, tail):
    ref = "docker-archive:/srv/a b;$(x).tar"         # passed as one argument, never through a shell
    assert convert_argv("aiportal-img", ["/opt/aiportal/venv/bin/aiportal"], ref, **kw) == [
        "runuser", "-u", "aiportal-img", "--", "/opt/aiportal/venv/bin/aiportal", "image", "convert", ref, *tail]


def _convert(*args, user=None, env=None, cwd="/"):
    argv = ([] if user is None else ["runuser", "-u", user, "--"]) + [AIPORTAL, "image", "convert", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=dict(os.environ, **(env or {})))


def test_another_user_is_refused_with_the_command_to_run():
    res = _convert("/x.sif", user="alice")
    assert res.returncode == 2
    assert "is written only by aiportal-img: run `sudo aiportal image convert /x.sif`" in res.stderr
    assert "`sudo -u aiportal-img aiportal image convert /x.sif`" in res.stderr


def test_another_user_sees_the_relative_path_resolved(tmp_path):
    os.chmod(tmp_path, 0o755)
    res = _convert("defs/x.def", user="alice", cwd=tmp_path)
    assert res.returncode == 2 and "sudo aiportal image convert %s/defs/x.def" % tmp_path in res.stderr


def test_root_without_the_builder_account_is_refused():
    res = _convert("/x.sif", env={"AIPORTAL_IMAGE_BUILDER_USER": "no-such-builder"})
    assert res.returncode == 2
    assert "the image builder account 'no-such-builder' does not exist on this host" in res.stderr
    assert "image_builder_user" in res.stderr


def test_root_is_told_when_the_builder_cannot_read_the_image(tmp_path):
    private = tmp_path / "private.tar"
    private.write_bytes(b"x")
    private.chmod(0o600)
    res = _convert("docker-archive:%s" % private)
    assert res.returncode == 2
    assert "aiportal-img cannot read %s" % private in res.stderr and "chmod o+r" in res.stderr


def test_as_digest_is_only_for_the_builder_and_only_with_a_sif():
    root = _convert("/x.sif", "--as-digest", "sha256:" + "ab" * 32)
    assert root.returncode == 2 and "--as-digest is how root hands a SIF it built to aiportal-img" in root.stderr
    bad = _convert("/x.def", "--as-digest", "nope", user="aiportal-img")
    assert bad.returncode == 2 and "give /PATH.sif and sha256:HEX" in bad.stderr

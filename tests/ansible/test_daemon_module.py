"""The aiportal_daemon module: started/stopped/restarted by pid file, idempotent, never
signalling a pid that runs another program. Driven through real `ansible` runs."""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "ansible" / "library"))
import aiportal_daemon  # noqa: E402

PORT = 9151  # tests' own range (DESIGN.md port plan: 9100-9199)


def module(tmp_path, **args):
    """Run the module once through `ansible -o` and return its result as a dict."""
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible" / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    res = subprocess.run([str(REPO / ".venv" / "bin" / "ansible"), "localhost", "-c", "local", "-o",
                          "-e", "ansible_python_interpreter=%s" % sys.executable,
                          "-m", "aiportal_daemon", "-a", json.dumps(args)],
                         capture_output=True, text=True, cwd=REPO / "ansible", env=env, timeout=120)
    line = next((x for x in res.stdout.splitlines() if x.startswith("localhost | ")), None)
    assert line, res.stdout + res.stderr
    result = json.loads(line.split(" => ", 1)[1])
    result["failed"] = " | FAILED" in line
    return result


@pytest.fixture
def server(tmp_path):
    pidfile = tmp_path / "srv.pid"
    args = dict(name="test http server", pidfile=str(pidfile), log=str(tmp_path / "srv.log"),
                argv=[sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(PORT)],
                program="python3" if "python3" in Path(sys.executable).name else Path(sys.executable).name,
                ready_port=PORT, timeout=20)
    yield args
    pid = aiportal_daemon.read_pid(str(pidfile))
    if aiportal_daemon.alive(pid, args["program"]):
        os.kill(pid, signal.SIGKILL)


def test_start_is_idempotent_and_stop_stops(tmp_path, server):
    first = module(tmp_path, **server)
    assert first["changed"] is True, first
    pid = aiportal_daemon.read_pid(server["pidfile"])
    assert aiportal_daemon.alive(pid)
    second = module(tmp_path, **server)
    assert second["changed"] is False and second["pid"] == pid
    restarted = module(tmp_path, **server, state="restarted")
    assert restarted["changed"] is True and restarted["pid"] != pid
    stopped = module(tmp_path, **server, state="stopped")
    assert stopped["changed"] is True
    assert not os.path.exists(server["pidfile"])
    assert module(tmp_path, **server, state="stopped")["changed"] is False


def mode(path) -> str:
    return "%04o" % stat.S_IMODE(os.stat(path).st_mode)


def test_the_log_is_made_0640_and_an_older_wider_one_is_narrowed(tmp_path, server):
    """A daemon's output names users, jobs and addresses: nobody but its owner and group reads it,
    whether the module makes the log, or an older install left it 0644 (running daemon or not)."""
    umask = os.umask(0o022)                     # what a root shell has: the module alone narrows
    try:
        assert module(tmp_path, **server)["changed"] is True
        assert mode(server["log"]) == "0640"
        os.chmod(server["log"], 0o644)
        again = module(tmp_path, **server)      # still running: only the log's mode changes
        assert again["changed"] is True and "log %s made 0640" % server["log"] in again["msg"], again
        assert mode(server["log"]) == "0640"
        assert module(tmp_path, **server)["changed"] is False
        module(tmp_path, **server, state="stopped")
        os.chmod(server["log"], 0o666)
        assert module(tmp_path, **server)["changed"] is True
        assert mode(server["log"]) == "0640"
        os.chmod(server["log"], 0o600)          # narrower than the module's: kept
        assert module(tmp_path, **server)["changed"] is False
        assert mode(server["log"]) == "0600"
    finally:
        os.umask(umask)


def test_a_stale_pid_of_another_program_is_not_signalled(tmp_path, server):
    other = subprocess.Popen(["sleep", "60"])
    try:
        Path(server["pidfile"]).write_text("%d\n" % other.pid)
        result = module(tmp_path, **server, state="stopped")
        assert result["changed"] is False
        assert other.poll() is None          # still running: not ours, not touched
    finally:
        other.kill()
        other.wait()


def test_a_daemon_that_dies_while_starting_fails_with_its_log(tmp_path):
    result = module(tmp_path, name="broken", pidfile=str(tmp_path / "b.pid"), log=str(tmp_path / "b.log"),
                    argv=[sys.executable, "-c", "import sys, time; time.sleep(0.5); sys.exit('boom: bad config')"],
                    ready_port=PORT + 1, timeout=20)
    assert result["failed"] is True
    assert "died while starting" in result["msg"]
    assert "boom: bad config" in result["log"]


def test_alive_rejects_zombies_and_other_programs():
    assert aiportal_daemon.alive(os.getpid())
    assert not aiportal_daemon.alive(os.getpid(), "slurmctld")
    assert not aiportal_daemon.alive(None)
    child = subprocess.Popen(["true"])
    time.sleep(0.3)                          # exited, not yet reaped: a zombie
    assert not aiportal_daemon.alive(child.pid)
    child.wait()

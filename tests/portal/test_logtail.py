"""Job logs over SSH (portal.logs.tail): pure parsers as tables, the rest against the real loopback
sshd (127.0.0.1:2222) as alice, on a log file in a folder alice owns.

Connection faults are made on our own session only: its server-side sshd processes are found
from the client's local port with ``ss`` and signalled by pid (never by name)."""
from __future__ import annotations

import math
import os
import pwd
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest

from portal.errors import LogTailError
from portal.logs.follow import TailNotice, follow_log, tail_notice
from portal.logs.tail import LogChunk, Progress, SshTarget, check_path, connect_ssh, parse_progress, read_log, target_for
from portal.settings import Settings

SSHD_PIDFILE = Path("/run/aiportal/sshd.pid")


# --- pure ---------------------------------------------------------------------------------

PROGRESS_TABLE = [
    ("2016-10-23 12:00:00.123456: step 10, loss = 4.67 (1234.5 examples/sec; 0.104 sec/batch)",
     [Progress(10, 4.67, 1234.5, 0.104)]),
    ("step 0, loss = 2.30 (12.0 examples/sec; 10.667 sec/batch)", [Progress(0, 2.30, 12.0, 10.667)]),
    ("I1023 12:00:00 train.py:88] step 1200, loss = 1.23e-4 (8.1E+2 examples/sec; .158 sec/batch)",
     [Progress(1200, 1.23e-4, 810.0, 0.158)]),
    ("[rank 0] step 7, loss = 0.5 (100 examples/sec; 1 sec/batch)  \r", [Progress(7, 0.5, 100.0, 1.0)]),
    ("step 3, loss = 2.1 (10.0 examples/sec; 1.0 sec/batch)\nnoise\nstep 4, loss = 2.0 (11.0 examples/sec; 0.9 sec/batch)\n",
     [Progress(3, 2.1, 10.0, 1.0), Progress(4, 2.0, 11.0, 0.9)]),
    ("Filling queue with 20000 CIFAR images before starting to train.", []),
    ("step 10, loss = 4.67 (1234.5 examples/sec; 0.1", []),             # cut off mid-line
    ("step ten, loss = 4.67 (1.0 examples/sec; 0.1 sec/batch)", []),
    ("mystep 1, loss = 1.0 (1.0 examples/sec; 1.0 sec/batch)", []),
    ("", []),
]


@pytest.mark.parametrize("text, expected", PROGRESS_TABLE)
def test_parse_progress(text, expected):
    assert parse_progress(text) == expected


@pytest.mark.parametrize("loss, check", [("nan", math.isnan), ("NaN", math.isnan),
                                         ("inf", lambda x: x == math.inf),
                                         ("-inf", lambda x: x == -math.inf)])
def test_parse_progress_keeps_a_diverged_loss(loss, check):
    [p] = parse_progress("step 5, loss = %s (10.0 examples/sec; 1.0 sec/batch)" % loss)
    assert p.step == 5 and check(p.loss) and p.examples_per_sec == 10.0


@pytest.mark.parametrize("line, notice", [
    ("tail: cannot open '/x/slurm-1.out' for reading: No such file or directory", TailNotice.MISSING),
    ("tail: '/x/slurm-1.out' has become inaccessible: No such file or directory", TailNotice.MISSING),
    ("tail: '/x/slurm-1.out' has appeared;  following new file", TailNotice.NEW_FILE),
    ("tail: '/x/slurm-1.out' has been replaced;  following new file", TailNotice.NEW_FILE),
    ("tail: /x/slurm-1.out: file truncated", TailNotice.TRUNCATED),
    ("tail: cannot open '/x/slurm-1.out' for reading: Permission denied", TailNotice.DENIED),
    ("tail: inotify cannot be used, reverting to polling", None),
    ("", None),
])
def test_tail_notice(line, notice):
    assert tail_notice(line) is notice


@pytest.mark.parametrize("path", ["relative/slurm-1.out", "", "/a\nb", "/a\rb", "/a\0b"])
def test_bad_paths_are_refused_before_anything_runs(path):
    with pytest.raises(ValueError):
        check_path(path)
    with pytest.raises(ValueError):
        follow_log(target_for(Settings(), "alice"), path)


def test_target_for_uses_the_settings_and_the_job_user():
    s = Settings.from_mapping({"log_ssh_host": "login1", "log_ssh_port": "2200"}, require_secrets=False)
    assert target_for(s, "alice") == SshTarget("login1", 2200, "alice", "/etc/aiportal/ssh/portal_ed25519",
                                               "/etc/aiportal/ssh/known_hosts")


@pytest.mark.parametrize("user", ["root", "", "a b", "-oProxyCommand=x", "Alice\n"])
def test_target_for_refuses_odd_users(user):
    with pytest.raises(ValueError):
        target_for(Settings(), user)


# --- fixtures and helpers for the sshd tests ------------------------------------------------

@pytest.fixture
def alice():
    return target_for(Settings(), "alice")


@pytest.fixture
def logs(job_dir):
    """``{job_dir}/logs`` owned by alice, like the batch script makes it."""
    d = job_dir / "logs"
    d.mkdir(mode=0o700)
    pw = pwd.getpwnam("alice")
    os.chown(d, pw.pw_uid, pw.pw_gid)
    return d


def append(path: Path, data: bytes) -> None:
    """Append like Slurm does (open-mode append), a file owned by alice."""
    new = not path.exists()
    with open(path, "ab") as f:
        f.write(data)
    if new:
        pw = pwd.getpwnam("alice")
        os.chown(path, pw.pw_uid, pw.pw_gid)


def lines(start: int, n: int) -> bytes:
    return b"".join(b"step %d, loss = %d.0 (1.0 examples/sec; 1.0 sec/batch)\n" % (i, i)
                    for i in range(start, start + n))


class Recording:
    """A connect function that records the transports it made."""

    def __init__(self):
        self.transports: list[paramiko.Transport] = []

    def __call__(self, target):
        t = connect_ssh(target)
        self.transports.append(t)
        return t


class Follower:
    """Consumes follow_log in a thread; the test waits on what has come in."""

    def __init__(self, target, path, **kw):
        self.stop = threading.Event()
        self.connect = Recording()
        self.chunks: list[tuple[float, LogChunk]] = []
        self.error: BaseException | None = None
        self._gen = follow_log(target, str(path), stop=self.stop, connect=self.connect, **kw)
        self._thread = threading.Thread(target=self._run, name="test-follower")
        self._thread.start()

    def _run(self):
        try:
            for chunk in self._gen:
                self.chunks.append((time.monotonic(), chunk))
        except BaseException as e:  # handed to the test thread
            self.error = e

    def data(self) -> bytes:
        return b"".join(c.data for _, c in self.chunks)

    def wait_for(self, predicate, timeout=10.0, what="condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error is not None:
                raise self.error
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError("%s not met after %.1f s; got %r, last chunks %r"
                             % (what, timeout, self.data()[-300:], [c for _, c in self.chunks if c.data or c is self.chunks[-1][1]]))

    def wait_data(self, expected: bytes, timeout=10.0):
        self.wait_for(lambda: len(self.data()) >= len(expected), timeout, "data of %d bytes" % len(expected))
        assert self.data() == expected

    def close(self):
        self.stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "follow_log did not stop"


@pytest.fixture
def follow():
    made = []

    def start(target, path, **kw):
        f = Follower(target, path, **kw)
        made.append(f)
        return f
    yield start
    for f in made:
        f.close()


def session_pids(transport: paramiko.Transport) -> list[int]:
    """The server-side sshd processes of this one connection (found by our local port)."""
    port = transport.sock.getsockname()[1]
    out = subprocess.run(["ss", "-Htnp", "state", "established", "(", "sport", "=", ":2222", "and",
                          "dport", "=", ":%d" % port, ")"], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    pids = sorted({int(p) for p in re.findall(r"pid=(\d+)", out)})
    listener = int(SSHD_PIDFILE.read_text())
    for pid in pids:
        cmdline = Path("/proc/%d/cmdline" % pid).read_bytes().decode()
        assert pid != listener and cmdline.startswith("sshd: alice"), (pid, cmdline)
    assert pids, "no sshd process found for local port %d: %r" % (port, out)
    return pids


def remote_tails(path: Path) -> list[int]:
    """Pids of processes running tail on this test's own path (looked at, never killed)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[:1] == [b"tail"] and str(path).encode() in argv:
                found.append(int(proc.name))
    return found


def assert_contiguous(chunks):
    """Each data chunk starts where the one before it ended (no gap, no overlap)."""
    data = [c for _, c in chunks if c.data]
    for a, b in zip(data, data[1:]):
        assert b.offset == a.end, (a, b)


# --- read_log -------------------------------------------------------------------------------

CONTENT = b"0123456789" * 10 + b"\nlast line\n"


@pytest.mark.ssh
@pytest.mark.parametrize("offset, limit", [(0, 1 << 20), (0, 10), (5, 7), (95, 1000), (111, 5),
                                           (len(CONTENT), 10), (1000, 10)])
def test_read_log_returns_the_asked_byte_range(alice, logs, offset, limit):
    log = logs / "slurm-1.out"
    append(log, CONTENT)
    chunk = read_log(alice, str(log), offset, limit)
    assert chunk == LogChunk(offset, CONTENT[offset:offset + limit], exists=True)


@pytest.mark.ssh
def test_read_log_of_a_log_not_written_yet_says_so(alice, logs):
    chunk = read_log(alice, str(logs / "slurm-2.out"))
    assert (chunk.data, chunk.exists) == (b"", False)


@pytest.mark.ssh
def test_read_log_of_a_large_log_is_exact(alice, logs):
    log = logs / "slurm-3.out"
    data = os.urandom(3 << 20)
    append(log, data)
    assert read_log(alice, str(log), 12345, 2 << 20).data == data[12345:12345 + (2 << 20)]


@pytest.mark.ssh
@pytest.mark.parametrize("name", ["a 0", "a'; echo foo", "$(touch pwned)", "`id`", "-n", "x;y|z&"])
def test_hostile_file_names_reach_the_remote_command_as_one_argument(alice, logs, name):
    log = logs / name
    append(log, b"exactly this\n")
    assert read_log(alice, str(log)).data == b"exactly this\n"
    assert sorted(p.name for p in logs.iterdir()) == [name]


@pytest.mark.ssh
def test_bob_cannot_read_alices_log(logs):
    log = logs / "slurm-4.out"
    append(log, CONTENT)
    bob = target_for(Settings(), "bob")
    with pytest.raises(LogTailError, match="as bob .*permission denied; .*only the job's owner") as err:
        read_log(bob, str(log))
    assert (err.value.code, err.value.status, err.value.user) == ("log_unavailable", 503, "bob")
    with pytest.raises(LogTailError, match="permission denied"):
        next(follow_log(bob, str(log), heartbeat_s=0.5))


@pytest.fixture
def other_host_key(tmp_path):
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    known = tmp_path / "known_hosts"
    known.write_text("[127.0.0.1]:2222 %s\n" % " ".join((tmp_path / "k.pub").read_text().split()[:2]))
    return str(known)


@pytest.mark.ssh
def test_a_host_key_that_does_not_match_the_pin_is_refused(alice, logs, other_host_key):
    log = logs / "slurm-5.out"
    append(log, CONTENT)
    wrong = SshTarget(alice.host, alice.port, "alice", alice.key_path, other_host_key)
    with pytest.raises(LogTailError, match="host key does not match the one pinned in %s" % other_host_key):
        read_log(wrong, str(log))
    t0 = time.monotonic()
    with pytest.raises(LogTailError, match="host key does not match"):
        next(follow_log(wrong, str(log), reconnect_max=5))
    assert time.monotonic() - t0 < 3, "a refused host key must not be retried"


@pytest.mark.ssh
def test_a_host_not_in_known_hosts_is_refused(alice, logs, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    target = SshTarget(alice.host, alice.port, "alice", alice.key_path, str(empty))
    with pytest.raises(LogTailError, match="is not pinned; pin the host key"):
        read_log(target, str(logs / "slurm-6.out"))


def test_follow_gives_up_after_reconnect_max_failures(alice):
    nothing_there = SshTarget("127.0.0.1", 9198, "alice", alice.key_path, alice.known_hosts, timeout=2)
    beats = []
    with pytest.raises(LogTailError, match="gave up after 2 failed reconnects; last: cannot connect"):
        for chunk in follow_log(nothing_there, "/srv/x.out", heartbeat_s=0.2, reconnect_max=2):
            beats.append(chunk)
    assert beats and all(c.data == b"" for c in beats)   # heartbeats while backing off


# --- follow_log -----------------------------------------------------------------------------

@pytest.mark.ssh
def test_follow_sees_appended_lines_within_a_second(alice, logs, follow):
    log = logs / "slurm-10.out"
    append(log, lines(0, 3))
    f = follow(alice, log, heartbeat_s=0.5)
    f.wait_data(lines(0, 3))
    expected = lines(0, 3)
    for i in range(3, 8):
        t0 = time.monotonic()
        append(log, lines(i, 1))
        expected += lines(i, 1)
        f.wait_data(expected, timeout=5)
        assert f.chunks[-1][0] - t0 < 1.0
    assert_contiguous(f.chunks)
    assert [p.step for p in parse_progress(f.data().decode())] == list(range(8))


@pytest.mark.ssh
def test_follow_from_an_offset_and_heartbeats(alice, logs, follow):
    log = logs / "slurm-11.out"
    append(log, CONTENT)
    f = follow(alice, log, offset=100, heartbeat_s=0.3)
    f.wait_data(CONTENT[100:])
    assert f.chunks[0][1].offset == 100
    f.wait_for(lambda: sum(1 for _, c in f.chunks if not c.data) >= 3, 5, "three heartbeats")
    assert all(c.offset == len(CONTENT) and c.exists for _, c in f.chunks if not c.data)


@pytest.mark.ssh
def test_follow_waits_for_a_log_that_does_not_exist_yet(alice, logs, follow):
    log = logs / "slurm-12.out"
    f = follow(alice, log, heartbeat_s=0.3)
    f.wait_for(lambda: any(not c.exists for _, c in f.chunks), 5, "a heartbeat saying no file yet")
    append(log, lines(0, 2))
    f.wait_data(lines(0, 2))
    assert f.chunks[-1][1].offset == 0


@pytest.mark.ssh
def test_follow_through_rotation(alice, logs, follow):
    log = logs / "slurm-13.out"
    append(log, lines(0, 3))
    f = follow(alice, log, heartbeat_s=0.3)
    f.wait_data(lines(0, 3))
    log.rename(logs / "slurm-13.out.1")
    append(log, lines(100, 2))
    f.wait_data(lines(0, 3) + lines(100, 2))
    # once quiet, the offset is that of the new file
    f.wait_for(lambda: f.chunks[-1][1].data == b"" and f.chunks[-1][1].offset == len(lines(100, 2)),
               5, "offset re-read from the new file")
    append(log, lines(102, 1))
    f.wait_data(lines(0, 3) + lines(100, 3))
    assert f.chunks[-1][1].offset == len(lines(100, 2))


@pytest.mark.ssh
def test_follow_through_truncation(alice, logs, follow):
    log = logs / "slurm-14.out"
    append(log, lines(0, 5))
    f = follow(alice, log, heartbeat_s=0.3)
    f.wait_data(lines(0, 5))
    with open(log, "r+b") as fh:
        fh.truncate(0)
    append(log, lines(200, 1))
    f.wait_data(lines(0, 5) + lines(200, 1))
    f.wait_for(lambda: f.chunks[-1][1].data == b"" and f.chunks[-1][1].offset == len(lines(200, 1)),
               5, "offset re-read after truncation")


@pytest.mark.ssh
def test_follow_resumes_byte_exact_after_the_connection_is_killed(alice, logs, follow):
    log = logs / "slurm-15.out"
    append(log, lines(0, 20))
    f = follow(alice, log, heartbeat_s=0.3, stall_s=5)
    f.wait_data(lines(0, 20))
    for pid in session_pids(f.connect.transports[0]):
        os.kill(pid, signal.SIGKILL)
    append(log, lines(20, 20))        # written while the connection is going away
    f.wait_for(lambda: len(f.connect.transports) >= 2, 10, "a reconnect")
    append(log, lines(40, 20))
    f.wait_data(lines(0, 60))
    assert_contiguous(f.chunks)


@pytest.fixture
def stopped():
    """Pids SIGSTOPped by a test; always continued at teardown."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


@pytest.mark.ssh
def test_a_silent_connection_is_noticed_and_resumed(alice, logs, follow, stopped):
    log = logs / "slurm-16.out"
    append(log, lines(0, 10))
    stall_s = 2.0
    f = follow(alice, log, heartbeat_s=0.3, stall_s=stall_s)
    f.wait_data(lines(0, 10))
    pids = session_pids(f.connect.transports[0])
    t0 = time.monotonic()
    for pid in pids:
        stopped.append(pid)
        os.kill(pid, signal.SIGSTOP)     # the TCP connection stays up, nothing answers
    append(log, lines(10, 10))
    f.wait_for(lambda: len(f.connect.transports) >= 2, stall_s + 5, "a reconnect")
    # stall_s after the last sign of life (at most one probe interval before the stop)
    assert time.monotonic() - t0 < stall_s + 1.5
    f.wait_data(lines(0, 20))
    append(log, lines(20, 5))
    f.wait_data(lines(0, 25))
    assert_contiguous(f.chunks)


@pytest.mark.ssh
def test_closing_the_generator_leaves_no_threads_and_no_remote_tail(alice, logs):
    log = logs / "slurm-17.out"
    append(log, CONTENT)
    before = set(threading.enumerate())
    gen = follow_log(alice, str(log), heartbeat_s=0.3)
    assert next(gen).data == CONTENT
    assert remote_tails(log), "tail should be running for alice"
    assert len(set(threading.enumerate()) - before) >= 2   # paramiko's thread and the probe
    gen.close()
    deadline = time.monotonic() + 5
    while (set(threading.enumerate()) - before or remote_tails(log)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(threading.enumerate()) - before == set()
    assert remote_tails(log) == []


@pytest.mark.ssh
def test_setting_stop_ends_the_follow(alice, logs):
    log = logs / "slurm-18.out"
    append(log, CONTENT)
    stop = threading.Event()
    before = set(threading.enumerate())
    gen = follow_log(alice, str(log), heartbeat_s=10, stop=stop)
    assert next(gen).data == CONTENT
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    assert list(gen) == []
    assert time.monotonic() - t0 < 1.5
    time.sleep(0.1)
    assert set(threading.enumerate()) - before == set()

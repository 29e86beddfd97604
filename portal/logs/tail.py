"""Job logs over SSH: a one-shot read and a live follow, as the job's own Unix user.

The portal runs as root but reads a job's log (``{job_dir}/logs/slurm-{id}.out``) by logging in
to the log sshd *as the job's user* with the portal's key, so users see only their own logs.
The host key is pinned (only ``known_hosts`` from the settings, ``RejectPolicy``; no agent, no
``~/.ssh`` keys).

The command run remotely is a shell command line (SSH exec takes a string): it is only ever
``shlex.join`` of a fixed argv list, after the path has been checked (absolute, no NUL or
newline). Every command runs under ``env LC_ALL=C`` so its messages can be recognised.

* :func:`read_log`: bytes ``[offset, offset + limit)`` of a log (``dd``), or an empty chunk with
  ``exists=False`` when there is no log yet.
* :func:`follow_log`: ``tail -c +N -F`` over one channel; yields chunks with their byte offsets,
  heartbeats when quiet, notices a dropped or silent connection and resumes from the last offset.
* :func:`parse_progress`: the TensorFlow CIFAR-10 ``step N, loss = X (...)`` lines, pure.
"""
from __future__ import annotations

import enum
import logging
import re
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import paramiko

from portal.errors import LogTailError

log = logging.getLogger(__name__)

#: what a connect function does: log in as ``target.user``, return the authenticated transport
Connect = Callable[["SshTarget"], paramiko.Transport]

_READ_BLOCK = 64 * 1024
_TICK_S = 0.2            # longest wait for data before checking stop/heartbeat/stall
_RESYNC_QUIET_S = 1.0    # quiet time before (and after) re-reading the size after a rotation
_BACKOFF_BASE_S = 0.5
_BACKOFF_MAX_S = 10.0
_JOIN_S = 2.0
_PROBE_REQUEST = "keepalive@openssh.com"


@dataclass(frozen=True)
class SshTarget:
    """Where and as whom to log in: ``user`` is the job's Unix user, never root."""

    host: str
    port: int
    user: str
    key_path: str
    known_hosts: str
    timeout: float = 10.0

    @property
    def address(self) -> str:
        return "%s:%d" % (self.host, self.port)


@dataclass(frozen=True)
class LogChunk:
    """Bytes of a log starting at byte ``offset`` of the file. Empty ``data`` is a heartbeat of
    :func:`follow_log` (or an empty read); ``exists`` is False while the file does not exist."""

    offset: int
    data: bytes
    exists: bool = True

    @property
    def end(self) -> int:
        """Offset just after this chunk: where the next read starts."""
        return self.offset + len(self.data)


@dataclass(frozen=True)
class Progress:
    """One training progress line: ``step N, loss = X (Y examples/sec; Z sec/batch)``.
    ``loss`` may be ``nan`` or ``inf`` (a diverged run): kept, so a plot can show the gap."""

    step: int
    loss: float
    examples_per_sec: float
    sec_per_batch: float


def target_for(settings, user: str) -> SshTarget:
    """The log sshd of ``settings`` (a :class:`portal.settings.Settings`), as Unix ``user``."""
    if not user or not re.fullmatch(r"[a-z_][a-z0-9_.-]*\$?", user) or user == "root":
        raise ValueError("not a job user name: %r" % user)
    return SshTarget(host=settings.log_ssh_host, port=settings.log_ssh_port, user=user,
                     key_path=settings.log_ssh_key, known_hosts=settings.log_ssh_known_hosts)


# --- connecting ---------------------------------------------------------------------------

class _HostKeyNotPinned(paramiko.SSHException):
    """The server's host key is not in the pinned known_hosts (or that file is unreadable)."""


class _PinnedHostKeys(paramiko.RejectPolicy):
    """RejectPolicy that raises its own error, so a missing pin is told apart from a network
    failure (and not retried)."""

    def missing_host_key(self, client, hostname, key):
        raise _HostKeyNotPinned("host key %s of %s is not pinned" % (key.get_name(), hostname))


def connect_ssh(target: SshTarget) -> paramiko.Transport:
    """Log in to ``target`` with its key only and the host key pinned; return the transport.

    Raises paramiko's errors (``BadHostKeyException``, ``AuthenticationException``, ...),
    ``_HostKeyNotPinned`` or ``OSError``; callers turn them into :class:`LogTailError`."""
    client = paramiko.SSHClient()
    try:
        client.load_host_keys(target.known_hosts)  # only this file: never ~/.ssh/known_hosts
    except OSError as e:
        raise _HostKeyNotPinned("cannot read known_hosts %s: %s" % (target.known_hosts, e)) from e
    client.set_missing_host_key_policy(_PinnedHostKeys())
    try:
        client.connect(target.host, target.port, username=target.user, key_filename=target.key_path,
                       timeout=target.timeout, banner_timeout=target.timeout,
                       auth_timeout=target.timeout, channel_timeout=target.timeout,
                       allow_agent=False, look_for_keys=False)
    except BaseException:
        client.close()
        raise
    return client.get_transport()


class _Retry(Exception):
    """A failure worth another try (network, sshd restarting, timeout)."""


def _fatal_error(target: SshTarget, path: str, e: Exception) -> LogTailError | None:
    """The LogTailError for a login failure that retrying cannot fix, else None."""
    if isinstance(e, paramiko.BadHostKeyException):
        return LogTailError(target.address, target.user, path,
                            "the host key does not match the one pinned in %s" % target.known_hosts,
                            "if the log sshd's key was changed on purpose, rerun the log_sshd role "
                            "to pin the new key; otherwise treat it as an attack")
    if isinstance(e, _HostKeyNotPinned):
        return LogTailError(target.address, target.user, path, str(e),
                            "pin the host key in %s (the log_sshd role writes it)" % target.known_hosts)
    if isinstance(e, paramiko.AuthenticationException):
        return LogTailError(target.address, target.user, path,
                            "login with key %s refused" % target.key_path,
                            "authorize %s.pub with 'restrict' in ~%s/.ssh/authorized_keys (the "
                            "log_sshd role does it for each user)" % (target.key_path, target.user))
    return None


def _connect(target: SshTarget, path: str, connect: Connect) -> paramiko.Transport:
    """``connect(target)`` with errors sorted: LogTailError (fatal) or _Retry (transient)."""
    try:
        return connect(target)
    except (OSError, EOFError, paramiko.SSHException) as e:
        fatal = _fatal_error(target, path, e)
        if fatal is not None:
            raise fatal from e
        raise _Retry("cannot connect to %s: %s" % (target.address, e or type(e).__name__)) from e


def _close_transport(transport: paramiko.Transport) -> None:
    """Close the transport and wait for its thread, so nothing is left running."""
    transport.close()
    transport.join(_JOIN_S)


# --- remote commands ----------------------------------------------------------------------

def check_path(path: str) -> str:
    """The log path, if it is absolute and has no NUL, CR or newline; else ValueError."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError("log path must be absolute: %r" % (path,))
    if any(c in path for c in "\0\n\r"):
        raise ValueError("log path contains NUL or a line break: %r" % (path,))
    return path


def _command(argv: list[str]) -> str:
    """The remote command line: the argv joined with shlex (the only way one is built)."""
    return shlex.join(["env", "LC_ALL=C", *argv])


def _dd_argv(path: str, offset: int, limit: int) -> list[str]:
    return ["dd", "if=%s" % path, "iflag=skip_bytes,count_bytes", "skip=%d" % offset,
            "count=%d" % limit, "bs=%d" % _READ_BLOCK, "status=none"]


def _stat_argv(path: str) -> list[str]:
    return ["stat", "-L", "-c", "%d:%i %s", path]


def _tail_argv(path: str, offset: int) -> list[str]:
    # -s: the poll interval where inotify cannot be used (NFS, and a log that does not exist
    # yet when following starts: a job page opened before Slurm created the file)
    return ["tail", "-c", "+%d" % (offset + 1), "-F", "-s", "0.2", path]


@dataclass(frozen=True)
class _Result:
    status: int
    stdout: bytes
    stderr: str


def _read_until_eof(recv: Callable[[int], bytes]) -> bytes:
    parts = []
    while True:
        data = recv(_READ_BLOCK)
        if not data:
            return b"".join(parts)
        parts.append(data)


def _exit_status(channel: paramiko.Channel, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while not channel.exit_status_ready():
        if time.monotonic() > deadline:
            raise socket.timeout("no exit status after %.1f s" % timeout)
        time.sleep(0.01)
    return channel.recv_exit_status()


def _run(transport: paramiko.Transport, argv: list[str], timeout: float) -> _Result:
    """Run argv remotely on its own channel; its output, errors and exit status."""
    command = _command(argv)
    log.debug("ssh exec: %s", command)
    channel = transport.open_session(timeout=timeout)
    try:
        channel.settimeout(timeout)
        channel.exec_command(command)
        stdout = _read_until_eof(channel.recv)
        stderr = _read_until_eof(channel.recv_stderr).decode(errors="replace")
        return _Result(_exit_status(channel, timeout), stdout, stderr)
    finally:
        channel.close()


def _denied(target: SshTarget, path: str) -> LogTailError:
    return LogTailError(target.address, target.user, path, "permission denied",
                        "a log is read as the job's Unix user: only the job's owner can read it")


def _check_result(target: SshTarget, path: str, res: _Result) -> bool:
    """True when the command succeeded, False when the file does not exist; else raise."""
    if res.status == 0:
        return True
    if "No such file or directory" in res.stderr:
        return False
    if "Permission denied" in res.stderr:
        raise _denied(target, path)
    raise LogTailError(target.address, target.user, path,
                       "remote command failed (exit %d): %s" % (res.status, res.stderr.strip()))


@dataclass(frozen=True)
class _FileStat:
    ident: str   # "device:inode"
    size: int


def _stat(target: SshTarget, transport: paramiko.Transport, path: str,
          timeout: float) -> _FileStat | None:
    """Identity and size of the remote file, None when it does not exist."""
    res = _run(transport, _stat_argv(path), timeout)
    if not _check_result(target, path, res):
        return None
    m = re.fullmatch(r"(\d+:\d+) (\d+)\n?", res.stdout.decode(errors="replace"))
    if m is None:
        raise LogTailError(target.address, target.user, path, "unexpected stat output %r" % res.stdout)
    return _FileStat(m.group(1), int(m.group(2)))


def read_log(target: SshTarget, path: str, offset: int = 0, limit: int = 1 << 20, *,
             connect: Connect = connect_ssh) -> LogChunk:
    """Bytes ``[offset, offset + limit)`` of the log at ``path``, read as ``target.user``.

    Returns an empty chunk with ``exists=False`` when the file does not exist (yet), and an
    empty chunk when ``offset`` is at or past its end. Raises :class:`LogTailError` when the
    sshd cannot be reached, the login or host key is refused, or the user may not read it."""
    check_path(path)
    if offset < 0 or limit <= 0:
        raise ValueError("need offset >= 0 and limit > 0, got %d and %d" % (offset, limit))
    try:
        transport = _connect(target, path, connect)
        try:
            res = _run(transport, _dd_argv(path, offset, limit), target.timeout)
        finally:
            _close_transport(transport)
    except _Retry as e:
        raise LogTailError(target.address, target.user, path, str(e)) from e
    except (OSError, EOFError, paramiko.SSHException) as e:
        raise LogTailError(target.address, target.user, path,
                           "connection failed while reading: %s" % (e or type(e).__name__)) from e
    if not _check_result(target, path, res):
        return LogChunk(offset, b"", exists=False)
    return LogChunk(offset, res.stdout)


# --- following ----------------------------------------------------------------------------

class TailNotice(enum.Enum):
    """What a line ``tail -F`` writes on stderr says about the file it follows."""

    MISSING = "missing"        # cannot open / has become inaccessible: no such file
    NEW_FILE = "new_file"      # has appeared / has been replaced: reading a new file from 0
    TRUNCATED = "truncated"    # file truncated: reading it again from 0
    DENIED = "denied"          # permission denied


def tail_notice(line: str) -> TailNotice | None:
    """Classify one stderr line of GNU ``tail -F`` (C locale); None for anything else."""
    if "Permission denied" in line:
        return TailNotice.DENIED
    if "No such file or directory" in line and ("cannot open" in line or "inaccessible" in line):
        return TailNotice.MISSING
    if line.endswith("following new file"):
        return TailNotice.NEW_FILE
    if line.endswith(": file truncated"):
        return TailNotice.TRUNCATED
    return None


@dataclass
class _Cursor:
    """Where the follow is in the file.

    tail reports a missing, replaced or truncated file on stderr, which sshd does not order
    with stdout: bytes of the new file can come before the notice, and the notice can come
    together with them. So after any notice ``exact`` is False until the offset has been
    re-read from the file's size at a quiet moment (see ``_Follow._resync``)."""

    offset: int
    ident: str | None = None
    exact: bool = True
    missing: bool = False
    awaiting_file: bool = False   # told MISSING: bytes since then are counted from 0 already

    def start(self, st: _FileStat | None) -> None:
        """Fix the offset to resume from, from the file as it is now (None: no file yet)."""
        if st is None:
            self.offset, self.ident, self.missing, self.awaiting_file = 0, None, True, True
            return
        if (self.ident is not None and st.ident != self.ident) or st.size < self.offset:
            log.info("log was replaced or truncated while disconnected; reading it from 0")
            self.offset = 0
        self.ident, self.missing, self.awaiting_file = st.ident, False, False

    def advance(self, n: int) -> None:
        self.offset += n
        self.missing = False

    def notice(self, notice: TailNotice) -> None:
        """Apply a MISSING, NEW_FILE or TRUNCATED notice of tail."""
        self.exact = False
        if notice is TailNotice.MISSING:
            self.offset, self.ident, self.missing, self.awaiting_file = 0, None, True, True
            return
        if not self.awaiting_file:
            self.offset = 0
        if notice is TailNotice.NEW_FILE:
            self.ident = None
        self.awaiting_file = self.missing = False


class _Prober(threading.Thread):
    """Asks the server for a reply every ``interval`` (``keepalive@openssh.com`` with
    want-reply) and records when one came: paramiko's own keepalive asks for none, so it
    keeps NATs open but cannot tell a live server from a silent one."""

    def __init__(self, transport: paramiko.Transport, interval: float):
        super().__init__(name="logtail-probe", daemon=True)
        self.transport = transport
        self.interval = interval
        self.last_reply = time.monotonic()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set() and self.transport.is_active():
            try:
                self.transport.global_request(_PROBE_REQUEST, wait=True)
            except (OSError, EOFError, paramiko.SSHException) as e:
                log.debug("keepalive probe ended: %s", e)
                return
            if self.transport.is_active():
                self.last_reply = time.monotonic()
            self._halt.wait(self.interval)

    def halt(self) -> None:
        self._halt.set()


@dataclass
class _Session:
    """One connection running tail, and when things last happened on it."""

    transport: paramiko.Transport
    channel: paramiko.Channel
    prober: _Prober
    started: float
    last_data: float
    last_rx: float
    delivered: bool = False
    stderr_buf: str = ""     # an incomplete stderr line
    last_stderr: str = ""    # the last complete one, for error messages
    resync: tuple[float, _FileStat] | None = None
    next_resync: float = 0.0

    def alive_at(self) -> float:
        """When the server last showed a sign of life (data, stderr, probe reply)."""
        return max(self.last_rx, self.prober.last_reply)

    def close(self) -> None:
        self.prober.halt()
        self.channel.close()
        _close_transport(self.transport)
        self.prober.join(_JOIN_S)


class _Follow:
    """The state of one :func:`follow_log`; :meth:`chunks` is the generator."""

    def __init__(self, target: SshTarget, path: str, offset: int, heartbeat_s: float,
                 stall_s: float, stop: threading.Event, reconnect_max: int, connect: Connect):
        self.target, self.path = target, path
        self.heartbeat_s, self.stall_s = heartbeat_s, stall_s
        self.stop, self.reconnect_max, self.connect = stop, reconnect_max, connect
        self.cursor = _Cursor(offset)
        self.last_yield = time.monotonic()
        self.probe_s = max(0.2, min(heartbeat_s, stall_s / 3))
        self.op_timeout = min(target.timeout, stall_s)

    # the loop over connections

    def chunks(self) -> Iterator[LogChunk]:
        failures = 0
        while not self.stop.is_set():
            try:
                session = self._open()
            except _Retry as e:
                failures = self._failed(failures, str(e))
                yield from self._backoff(failures)
                continue
            try:
                yield from self._pump(session)
            finally:
                session.close()
            if self.stop.is_set():
                return
            if session.delivered or time.monotonic() - session.started >= min(self.heartbeat_s, self.stall_s):
                failures = 0
                log.info("reconnecting to %s as %s to follow %s from byte %d",
                         self.target.address, self.target.user, self.path, self.cursor.offset)
            else:
                failures = self._failed(failures, "tail ended at once: %s" % session.last_stderr)
                yield from self._backoff(failures)

    def _failed(self, failures: int, reason: str) -> int:
        failures += 1
        log.warning("following %s as %s on %s failed (%d/%d): %s", self.path, self.target.user,
                    self.target.address, failures, self.reconnect_max, reason)
        if failures > self.reconnect_max:
            raise LogTailError(self.target.address, self.target.user, self.path,
                               "gave up after %d failed reconnects; last: %s"
                               % (self.reconnect_max, reason))
        return failures

    def _backoff(self, failures: int) -> Iterator[LogChunk]:
        """Wait before the next try, still yielding heartbeats; returns early on stop."""
        deadline = time.monotonic() + min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2 ** (failures - 1))
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= deadline:
                return
            if now - self.last_yield >= self.heartbeat_s:
                yield self._heartbeat()
            self.stop.wait(min(deadline - now, self.heartbeat_s))

    def _open(self) -> _Session:
        """Connect, fix the offset to resume from, start tail and the keepalive probe."""
        transport = _connect(self.target, self.path, self.connect)
        try:
            self.cursor.start(_stat(self.target, transport, self.path, self.op_timeout))
            channel = transport.open_session(timeout=self.op_timeout)
            channel.settimeout(_TICK_S)
            channel.exec_command(_command(_tail_argv(self.path, self.cursor.offset)))
        except (OSError, EOFError, paramiko.SSHException) as e:
            _close_transport(transport)
            raise _Retry("cannot start tail: %s" % (e or type(e).__name__)) from e
        except BaseException:
            _close_transport(transport)
            raise
        log.debug("following %s as %s from byte %d", self.path, self.target.user, self.cursor.offset)
        transport.set_keepalive(max(1, int(self.probe_s)))
        prober = _Prober(transport, self.probe_s)
        prober.start()
        now = time.monotonic()
        return _Session(transport, channel, prober, started=now, last_data=now, last_rx=now)

    # one connection

    def _pump(self, s: _Session) -> Iterator[LogChunk]:
        """Yield chunks from one session until it ends, stalls or stop is set."""
        while not self.stop.is_set():
            self._read_stderr(s)
            data = self._recv(s)
            now = time.monotonic()
            if data is None:
                log.info("tail of %s as %s ended (%s)", self.path, self.target.user,
                         "connection lost" if not s.transport.is_active() else "remote exit")
                return
            if data:
                s.delivered, s.last_data, s.last_rx, s.resync = True, now, now, None
                yield self._emit(data)
            elif now - self.last_yield >= self.heartbeat_s:
                yield self._heartbeat()
            if now - s.alive_at() > self.stall_s:
                log.warning("no sign of life from %s for %.1f s; reconnecting",
                            self.target.address, now - s.alive_at())
                return
            if not self.cursor.exact and not self._resync(s, now):
                return

    def _recv(self, s: _Session) -> bytes | None:
        """Next stdout bytes; b"" when none came within a tick; None at end of stream."""
        try:
            data = s.channel.recv(_READ_BLOCK)
        except socket.timeout:
            return b""
        return data or None

    def _read_stderr(self, s: _Session) -> None:
        """Act on tail's complete stderr lines (rotation, truncation, missing, denied)."""
        while s.channel.recv_stderr_ready():
            s.last_rx = time.monotonic()
            s.stderr_buf = (s.stderr_buf + s.channel.recv_stderr(4096).decode(errors="replace"))[-8192:]
        *lines, s.stderr_buf = s.stderr_buf.split("\n")
        for line in lines:
            s.last_stderr = line
            self._on_stderr_line(line)

    def _on_stderr_line(self, line: str) -> None:
        notice = tail_notice(line)
        log.debug("tail: %s", line)
        if notice is TailNotice.DENIED:
            raise _denied(self.target, self.path)
        if notice is not None:
            log.info("%s: %s (offset %d)", self.path, notice.value, self.cursor.offset)
            self.cursor.notice(notice)

    def _resync(self, s: _Session, now: float) -> bool:
        """After a rotation notice, at a quiet moment, take the offset from the file's size
        (and apply it only if no data came in the quiet time after). False if the link died."""
        if now - s.last_data < _RESYNC_QUIET_S or now < s.next_resync:
            return True
        if s.resync is not None and now - s.resync[0] >= _RESYNC_QUIET_S:
            st = s.resync[1]
            log.info("%s: offset re-read from the file: %d -> %d", self.path, self.cursor.offset, st.size)
            self.cursor.offset, self.cursor.ident, self.cursor.exact = st.size, st.ident, True
            s.resync = None
            return True
        if s.resync is None:
            try:
                st = _stat(self.target, s.transport, self.path, self.op_timeout)
            except (OSError, EOFError, paramiko.SSHException) as e:
                log.info("re-reading the size of %s failed: %s", self.path, e)
                return False
            s.next_resync = now + _RESYNC_QUIET_S
            if st is None:   # gone: whatever file comes next is read from 0 (and announced)
                self.cursor.start(None)
                self.cursor.exact = True
            else:
                s.resync = (time.monotonic(), st)
        return True

    def _emit(self, data: bytes) -> LogChunk:
        chunk = LogChunk(self.cursor.offset, data)
        self.cursor.advance(len(data))
        self.last_yield = time.monotonic()
        return chunk

    def _heartbeat(self) -> LogChunk:
        self.last_yield = time.monotonic()
        return LogChunk(self.cursor.offset, b"", exists=not self.cursor.missing)


def follow_log(target: SshTarget, path: str, offset: int = 0, *, heartbeat_s: float = 5.0,
               stall_s: float = 15.0, stop: threading.Event | None = None, reconnect_max: int = 6,
               connect: Connect = connect_ssh) -> Iterator[LogChunk]:
    """Follow the log at ``path`` from byte ``offset``, as ``target.user``.

    Runs ``tail -c +OFFSET -F path`` over one SSH channel and yields :class:`LogChunk` s as bytes
    arrive (``offset`` of each is its position in the file); follows a file that does not exist
    yet, and through rotation and truncation (offsets start again at 0). Yields an empty
    heartbeat chunk after ``heartbeat_s`` without data. When the connection drops, or nothing
    (no data, no reply to the keepalive probe) has come for ``stall_s``, it reconnects and
    resumes from the last offset, byte-exact; consecutive failed reconnects back off
    exponentially, and after ``reconnect_max`` of them :class:`LogTailError` is raised. A host
    key or login that is refused, or a log the user may not read, raises at once.

    Ends when ``stop`` is set or the generator is closed, closing channel and connection and
    joining its threads. Offsets around a rotation are re-read from the file's size at the next
    quiet moment (tail reports the switch on stderr, which is not ordered with stdout)."""
    check_path(path)
    if offset < 0 or heartbeat_s <= 0 or stall_s <= 0 or reconnect_max < 0:
        raise ValueError("need offset >= 0, heartbeat_s > 0, stall_s > 0 and reconnect_max >= 0")
    follow = _Follow(target, path, offset, heartbeat_s, stall_s, stop or threading.Event(),
                     reconnect_max, connect)
    return follow.chunks()


# --- progress lines -----------------------------------------------------------------------

_NUM = r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?|nan|inf(?:inity)?)"
_PROGRESS = re.compile(r"\bstep\s+(\d+),\s*loss\s*=\s*(%s)\s*\(\s*(%s)\s+examples/sec;\s*(%s)\s+sec/batch\s*\)"
                       % (_NUM, _NUM, _NUM), re.IGNORECASE)


def parse_progress(text: str) -> list[Progress]:
    """The progress lines in ``text`` (``step N, loss = X (Y examples/sec; Z sec/batch)``, as
    the TensorFlow CIFAR-10 example prints them), in order. A prefix before ``step`` (a
    timestamp) is allowed; other lines are skipped. ``nan``/``inf`` are kept as floats."""
    out = []
    for line in text.splitlines():
        m = _PROGRESS.search(line)
        if m:
            out.append(Progress(int(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4))))
    return out

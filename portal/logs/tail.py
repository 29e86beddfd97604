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
* :func:`portal.logs.follow.follow_log`: the live follow, built on this module's connection,
  command and stat helpers.
* :func:`parse_progress`: the TensorFlow CIFAR-10 ``step N, loss = X (...)`` lines, pure.
"""
from __future__ import annotations

import logging
import re
import shlex
import socket
import time
from dataclasses import dataclass
from typing import Callable

import paramiko

from portal.errors import LogTailError

log = logging.getLogger(__name__)

#: what a connect function does: log in as ``target.user``, return the authenticated transport
Connect = Callable[["SshTarget"], paramiko.Transport]

READ_BLOCK = 64 * 1024
JOIN_S = 2.0             # longest wait for a closed connection's thread


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


class Retry(Exception):
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


def open_transport(target: SshTarget, path: str, connect: Connect) -> paramiko.Transport:
    """``connect(target)`` with errors sorted: LogTailError (fatal) or Retry (transient)."""
    try:
        return connect(target)
    except (OSError, EOFError, paramiko.SSHException) as e:
        fatal = _fatal_error(target, path, e)
        if fatal is not None:
            raise fatal from e
        raise Retry("cannot connect to %s: %s" % (target.address, e or type(e).__name__)) from e


def close_transport(transport: paramiko.Transport) -> None:
    """Close the transport and wait for its thread, so nothing is left running."""
    transport.close()
    transport.join(JOIN_S)


# --- remote commands ----------------------------------------------------------------------

def check_path(path: str) -> str:
    """The log path, if it is absolute and has no NUL, CR or newline; else ValueError."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError("log path must be absolute: %r" % (path,))
    if any(c in path for c in "\0\n\r"):
        raise ValueError("log path contains NUL or a line break: %r" % (path,))
    return path


def remote_command(argv: list[str]) -> str:
    """The remote command line: the argv joined with shlex (the only way one is built)."""
    return shlex.join(["env", "LC_ALL=C", *argv])


def _dd_argv(path: str, offset: int, limit: int) -> list[str]:
    return ["dd", "if=%s" % path, "iflag=skip_bytes,count_bytes", "skip=%d" % offset,
            "count=%d" % limit, "bs=%d" % READ_BLOCK, "status=none"]


def _stat_argv(path: str) -> list[str]:
    return ["stat", "-L", "-c", "%d:%i %s", path]


def tail_argv(path: str, offset: int) -> list[str]:
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
        data = recv(READ_BLOCK)
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
    command = remote_command(argv)
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


def denied(target: SshTarget, path: str) -> LogTailError:
    return LogTailError(target.address, target.user, path, "permission denied",
                        "a log is read as the job's Unix user: only the job's owner can read it")


def _check_result(target: SshTarget, path: str, res: _Result) -> bool:
    """True when the command succeeded, False when the file does not exist; else raise."""
    if res.status == 0:
        return True
    if "No such file or directory" in res.stderr:
        return False
    if "Permission denied" in res.stderr:
        raise denied(target, path)
    raise LogTailError(target.address, target.user, path,
                       "remote command failed (exit %d): %s" % (res.status, res.stderr.strip()))


@dataclass(frozen=True)
class FileStat:
    ident: str   # "device:inode"
    size: int


def stat_log(target: SshTarget, transport: paramiko.Transport, path: str,
          timeout: float) -> FileStat | None:
    """Identity and size of the remote file, None when it does not exist."""
    res = _run(transport, _stat_argv(path), timeout)
    if not _check_result(target, path, res):
        return None
    m = re.fullmatch(r"(\d+:\d+) (\d+)\n?", res.stdout.decode(errors="replace"))
    if m is None:
        raise LogTailError(target.address, target.user, path, "unexpected stat output %r" % res.stdout)
    return FileStat(m.group(1), int(m.group(2)))


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
        transport = open_transport(target, path, connect)
        try:
            res = _run(transport, _dd_argv(path, offset, limit), target.timeout)
        finally:
            close_transport(transport)
    except Retry as e:
        raise LogTailError(target.address, target.user, path, str(e)) from e
    except (OSError, EOFError, paramiko.SSHException) as e:
        raise LogTailError(target.address, target.user, path,
                           "connection failed while reading: %s" % (e or type(e).__name__)) from e
    if not _check_result(target, path, res):
        return LogChunk(offset, b"", exists=False)
    return LogChunk(offset, res.stdout)


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

"""Following a job's log live over SSH: ``tail -c +N -F`` over one channel of a connection made
by :mod:`portal.logs.tail` (as the job's user, host key pinned); yields chunks with their byte
offsets, heartbeats when quiet, notices a dropped or silent connection (a keepalive probe) and
resumes from the last offset, and re-reads the size after a rotation or truncation."""
from __future__ import annotations

import enum
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import paramiko

from portal.errors import LogTailError
from portal.logs.tail import (JOIN_S, READ_BLOCK, check_path, Connect, FileStat, LogChunk, Retry, SshTarget, close_transport, connect_ssh,
                              denied, open_transport, remote_command, stat_log, tail_argv)

log = logging.getLogger(__name__)

_TICK_S = 0.2            # longest wait for data before checking stop/heartbeat/stall
_RESYNC_QUIET_S = 1.0    # quiet time before (and after) re-reading the size after a rotation
_BACKOFF_BASE_S = 0.5
_BACKOFF_MAX_S = 10.0
_PROBE_REQUEST = "keepalive@openssh.com"


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

    def start(self, st: FileStat | None) -> None:
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
    resync: tuple[float, FileStat] | None = None
    next_resync: float = 0.0

    def alive_at(self) -> float:
        """When the server last showed a sign of life (data, stderr, probe reply)."""
        return max(self.last_rx, self.prober.last_reply)

    def close(self) -> None:
        self.prober.halt()
        self.channel.close()
        close_transport(self.transport)
        self.prober.join(JOIN_S)


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
            except Retry as e:
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
        transport = open_transport(self.target, self.path, self.connect)
        try:
            self.cursor.start(stat_log(self.target, transport, self.path, self.op_timeout))
            channel = transport.open_session(timeout=self.op_timeout)
            channel.settimeout(_TICK_S)
            channel.exec_command(remote_command(tail_argv(self.path, self.cursor.offset)))
        except (OSError, EOFError, paramiko.SSHException) as e:
            close_transport(transport)
            raise Retry("cannot start tail: %s" % (e or type(e).__name__)) from e
        except BaseException:
            close_transport(transport)
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
            data = s.channel.recv(READ_BLOCK)
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
            raise denied(self.target, self.path)
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
                st = stat_log(self.target, s.transport, self.path, self.op_timeout)
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

"""Bounded probes: every command the health check runs has a deadline it cannot overstay.

``subprocess.run(timeout=...)`` kills a late child and then *waits* for it, which never ends for
a process stuck in the kernel on a dead NFS server (state D). :func:`bounded_run` kills, waits
at most one more second, and abandons the child if it still has not gone.

Filesystem probes (statvfs, a write/read/unlink round trip) run in a child process
(``python -m monitor.probe fs PATH``) for the same reason: the health check itself never
touches a filesystem that can hang.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: the environment Slurm gives HealthCheckProgram has no PATH (only SLURMD_NODENAME)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def probe_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOME", "/root" if os.geteuid() == 0 else "/tmp")
    env["LC_ALL"] = "C"
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class ProbeResult:
    argv: tuple[str, ...]
    returncode: int | None       #: None: killed at its deadline (or could not start)
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False
    error: str = ""              #: could not start (missing program, ...)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def why(self) -> str:
        """Short text for a verdict: ``timeout``, ``exit 1: <last stderr line>``, ..."""
        if self.error:
            return self.error
        if self.timed_out:
            return "no answer in %.0fs" % self.seconds
        last = (self.stderr.strip().splitlines() or self.stdout.strip().splitlines() or [""])[-1]
        return "exit %s%s" % (self.returncode, (": " + last[:160]) if last else "")


def bounded_run(argv: list[str], timeout: float, stdin: str | None = None,
                env: dict[str, str] | None = None) -> ProbeResult:
    """Run argv (never a shell) for at most ``timeout`` seconds (+1 s to reap it)."""
    t0 = time.monotonic()
    log.debug("probe %s", shlex.join(argv))
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env or probe_env(), cwd="/", start_new_session=True)
    except OSError as e:
        return ProbeResult(tuple(argv), None, "", "", time.monotonic() - t0,
                           error="cannot run %s: %s" % (argv[0], e.strerror or e))
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
        return ProbeResult(tuple(argv), proc.returncode, out, err, time.monotonic() - t0)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, 9)       # its own session: helpers it started go too
        except OSError:
            proc.kill()
        try:
            out, err = proc.communicate(timeout=1.0)
        except subprocess.TimeoutExpired:
            out, err = "", ""            # stuck in the kernel: abandoned, never waited for
            log.warning("probe %s did not die after SIGKILL; abandoned (pid %d)", argv[0], proc.pid)
        return ProbeResult(tuple(argv), None, out or "", err or "", time.monotonic() - t0, timed_out=True)


def fs_probe(path: str, write_name: str | None, timeout: float, hang: bool = False) -> ProbeResult:
    """statvfs of ``path`` and, with ``write_name``, a write/fsync/read/unlink of that file in
    it, in a child process bounded by ``timeout``. stdout of a good run is one JSON object:
    ``{"free_mb", "total_mb", "written"}``. ``hang`` makes the child block (dev fault
    injection: emulates a stuck NFS mount, so the real timeout path runs)."""
    argv = [sys.executable, "-m", "monitor.probe", "fs", path]
    if write_name:
        argv += ["--write", write_name]
    if hang:
        argv.append("--hang")
    return bounded_run(argv, timeout)


def _fs_main(args: list[str]) -> int:
    path = args[0]
    write = args[args.index("--write") + 1] if "--write" in args else None
    if "--hang" in args:
        time.sleep(3600)
    st = os.statvfs(path)
    out = {"free_mb": st.f_bavail * st.f_frsize // (1024 * 1024),
           "total_mb": st.f_blocks * st.f_frsize // (1024 * 1024), "written": False}
    if write:
        target = os.path.join(path, write)
        data = ("aiportal health probe %d\n" % os.getpid()).encode()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(target, "rb") as fh:
            back = fh.read()
        os.unlink(target)
        if back != data:
            print("read back %d bytes that differ from what was written" % len(back), file=sys.stderr)
            return 3
        out["written"] = True
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "fs":
        try:
            return _fs_main(args[1:])
        except OSError as e:
            print("%s: %s" % (e.filename or args[1], e.strerror or e), file=sys.stderr)
            return 2
    print("usage: python -m monitor.probe fs PATH [--write NAME] [--hang]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

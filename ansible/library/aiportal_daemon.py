#!/usr/bin/python
"""Start, stop or restart a daemon tracked by a pid file, for hosts without systemd.

The dev cluster runs on machines with no init system (CI VMs, containers), so the roles start
their daemons directly. This module makes that idempotent: a daemon whose pid file names a live
process running the expected program is left alone (``changed=false``), so a second playbook
run reports ``changed=0``.
"""
from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: aiportal_daemon
short_description: Keep a pid-file daemon started, stopped or restarted (no systemd)
options:
  name: {description: Human name used in messages, type: str, required: true}
  argv: {description: Command line as a list (never through a shell), type: list, elements: str}
  program: {description: Program the live pid must run (default argv[0]; set it when argv starts with runuser), type: str}
  pidfile: {description: Pid file of the daemon, type: path, required: true}
  state: {choices: [started, stopped, restarted], default: started, type: str}
  forks: {description: The program daemonizes itself and writes the pid file, type: bool, default: false}
  user: {description: Run as this user (only when forks is false), type: str}
  env: {description: Extra environment, type: dict}
  chdir: {type: path}
  log: {description: "File for stdout/stderr when forks is false; made 0640, bits beyond that taken off an existing one", type: path}
  ready_port: {description: Wait until 127.0.0.1:PORT accepts connections, type: int}
  ready_path: {description: Wait until this path exists (a socket, say), type: path}
  ready_argv: {description: Wait until this command exits 0, type: list, elements: str}
  timeout: {description: Seconds to wait for start, readiness or stop, type: float, default: 60}
"""


#: the most a daemon's log file may allow: its owner writes, its group reads, nobody else
LOG_MODE = 0o640


def open_log(path):
    """The log ``path`` for appending, created LOG_MODE; an existing one keeps no bit beyond it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_MODE)
    narrow_log(path)
    return os.fdopen(fd, "ab")


def narrow_log(path):
    """Take the bits beyond LOG_MODE off an existing log (an older install made them 0644);
    True when its mode changed."""
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return False
    if not mode & ~LOG_MODE:
        return False
    os.chmod(path, mode & LOG_MODE)
    return True


def read_pid(pidfile):
    try:
        with open(pidfile) as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid, program=None):
    """True when pid is a live, non-zombie process (running ``program`` if given)."""
    if not pid:
        return False
    try:
        with open("/proc/%d/stat" % pid) as fh:
            stat = fh.read()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    if program:
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as fh:
                cmd = fh.read().split(b"\0")
        except OSError:
            return False
        base = os.path.basename(program).encode()
        # interpreters (python, gunicorn) show the script as a later argument, and daemons
        # that set their process title (sshd: "sshd: /usr/sbin/sshd -f ... [listener]") put
        # everything into the first argument
        tokens = [t.rstrip(b":") for part in cmd[:3] for t in part.split()]
        if not any(os.path.basename(t) == base for t in tokens):
            return False
    return True


def wait_until(pred, timeout, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def tail(path, n=20):
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-n:])
    except OSError:
        return ""


def start(module, p):
    env = dict(os.environ)
    env.update({k: str(v) for k, v in (p["env"] or {}).items()})
    argv = p["argv"]
    if p["forks"]:
        res = subprocess.run(argv, env=env, cwd=p["chdir"], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=p["timeout"])
        if res.returncode != 0:
            module.fail_json(msg="%s: %s exited %d" % (p["name"], argv[0], res.returncode),
                             argv=argv, rc=res.returncode, stdout=res.stdout, stderr=res.stderr)
        if not wait_until(lambda: alive(read_pid(p["pidfile"])), p["timeout"]):
            module.fail_json(msg="%s did not write a live pid to %s within %ss"
                             % (p["name"], p["pidfile"], p["timeout"]), argv=argv,
                             stdout=res.stdout, stderr=res.stderr)
        return
    preexec = None
    if p["user"]:
        pw = pwd.getpwnam(p["user"])
        env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)

        def preexec():
            os.initgroups(pw.pw_name, pw.pw_gid)
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
    log = open_log(p["log"]) if p["log"] else open(os.devnull, "ab")
    proc = subprocess.Popen(argv, env=env, cwd=p["chdir"], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=preexec, close_fds=True)
    log.close()
    os.makedirs(os.path.dirname(p["pidfile"]) or ".", exist_ok=True)
    with open(p["pidfile"], "w") as fh:
        fh.write("%d\n" % proc.pid)
    time.sleep(0.2)
    if proc.poll() is not None:
        module.fail_json(msg="%s exited at once with %s" % (p["name"], proc.returncode),
                         argv=argv, log=tail(p["log"]) if p["log"] else "")


def wait_ready(module, p):
    checks = []
    if p["ready_port"]:
        checks.append(("port %d" % p["ready_port"], lambda: port_open(p["ready_port"])))
    if p["ready_path"]:
        checks.append((p["ready_path"], lambda: os.path.exists(p["ready_path"])))
    if p["ready_argv"]:
        def cmd_ok():
            try:
                return subprocess.run(p["ready_argv"], stdin=subprocess.DEVNULL,
                                      capture_output=True, timeout=10).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                return False
        checks.append((" ".join(p["ready_argv"]), cmd_ok))
    def dead():
        # fail fast when the daemon we track died while we wait for it
        return not alive(read_pid(p["pidfile"]), p["program"])

    for what, pred in checks:
        if not wait_until(lambda: pred() or dead(), p["timeout"], step=0.2) or dead():
            module.fail_json(msg="%s is not running (pid file %s); it died while starting"
                             % (p["name"], p["pidfile"]),
                             log=tail(p["log"]) if p["log"] else "")
        if not pred():
            module.fail_json(msg="%s started but %s was not ready within %ss"
                             % (p["name"], what, p["timeout"]),
                             log=tail(p["log"]) if p["log"] else "")


def stop(module, p):
    pid = read_pid(p["pidfile"])
    # never signal a recycled pid: only the program we started (when argv is known)
    was = alive(pid, p["program"])
    if was:
        os.kill(pid, signal.SIGTERM)
        if not wait_until(lambda: not alive(pid), p["timeout"]):
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not alive(pid), 10)
    if os.path.exists(p["pidfile"]):
        os.unlink(p["pidfile"])
    return was


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            argv=dict(type="list", elements="str"),
            program=dict(type="str"),
            pidfile=dict(type="path", required=True),
            state=dict(type="str", default="started", choices=["started", "stopped", "restarted"]),
            forks=dict(type="bool", default=False),
            user=dict(type="str"),
            env=dict(type="dict"),
            chdir=dict(type="path"),
            log=dict(type="path"),
            ready_port=dict(type="int"),
            ready_path=dict(type="path"),
            ready_argv=dict(type="list", elements="str"),
            timeout=dict(type="float", default=60.0),
        ),
        required_if=[("state", "started", ["argv"]), ("state", "restarted", ["argv"])],
        supports_check_mode=True,
    )
    p = module.params
    program = p["program"] or (p["argv"][0] if p["argv"] else None)
    p["program"] = program
    pid = read_pid(p["pidfile"])
    running = alive(pid, program)
    state = p["state"]
    if state == "started" and running:
        wait_ready(module, p)
        # a running daemon's log made by an older install is narrowed all the same
        narrowed = bool(p["log"]) and not p["forks"] and not module.check_mode and narrow_log(p["log"])
        module.exit_json(changed=narrowed, pid=pid, msg="%s already running%s"
                         % (p["name"], "; log %s made %04o" % (p["log"], LOG_MODE) if narrowed else ""))
    if state == "stopped" and not running:
        if os.path.exists(p["pidfile"]) and not module.check_mode:
            os.unlink(p["pidfile"])
        module.exit_json(changed=False, msg="%s not running" % p["name"])
    if module.check_mode:
        module.exit_json(changed=True)
    if state in ("stopped", "restarted"):
        stop(module, p)
        if state == "stopped":
            module.exit_json(changed=True, msg="%s stopped" % p["name"])
    start(module, p)
    wait_ready(module, p)
    module.exit_json(changed=True, pid=read_pid(p["pidfile"]), msg="%s started" % p["name"])


if __name__ == "__main__":
    main()

"""Dockerfile builds: ``aiportal image build`` and ``image builds`` (clients of the API), and
``aiportal image build-run``, what the build's Slurm job runs as the user.

The client packs the context (honouring simple ``.dockerignore`` patterns), uploads it as a tar
with the tag and the Dockerfile's path, then follows the build's log until the build has ended;
it exits 0 only when the image was pushed, and prints the pinned ``REPO@sha256:...``.

The runner reads ``build.json`` from the build folder the portal prepared (the context is
unpacked already), runs ``buildah bud`` then ``buildah push`` (argv from
:mod:`containers.build`) with the user's storage on the node's local disk, limits the processes
and the storage, stops everything it started after the time-out, writes the pushed digest to
``digest`` and removes the authfile whatever happens.
"""
from __future__ import annotations

import ctypes
import fnmatch
import io
import json
import os
import pwd
import stat
import subprocess
import sys
import tarfile
import time
import urllib.parse
from pathlib import Path

from containers.build import (BuildSpec, Limits, Storage, build_env, bud_argv, parse_build_tag, prune_argv,
                              push_argv, rmi_argv, storage_dir, usage_argv, wipe_argv)
from containers.errors import ContainerError
from portal.cli.client import (ApiError, CliError, PortalUnreachable, SseParser, _api, _print_json, _when,
                                denied_message)

_PR_SET_CHILD_SUBREAPER = 36
#: seconds between checks of the storage's size while buildah runs
_USAGE_EVERY_S = 3.0


# -- the runner, inside the build job ---------------------------------------------------------------

def _say(text: str) -> None:
    print("aiportal: [%s] %s" % (time.strftime("%H:%M:%S"), text), flush=True)


class _BuildFailed(Exception):
    pass


def _prepare_storage(storage: Storage) -> None:
    """The user's storage folders, created 0700; refused when someone else owns them."""
    uid = os.getuid()
    for d in storage.folders():
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            raise _BuildFailed("%s is not a folder of yours (owner uid %d): remove it or ask an admin to "
                               "(builds keep their storage there)" % (d, st.st_uid))
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(d, 0o700)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_tree() -> int:
    """SIGKILL every process below this one until none is left (orphans come back to us: we are
    a subreaper); returns how many were killed."""
    killed = 0
    for _ in range(200):
        pids = _descendants(os.getpid())
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, 9)
                killed += 1
            except OSError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return killed


def _usage(storage: Storage) -> int:
    res = subprocess.run(usage_argv(storage), capture_output=True, text=True, timeout=120, check=False,
                         env=build_env(storage))
    try:
        return int(res.stdout.split()[0])
    except (IndexError, ValueError):
        return 0


def _run_step(what: str, argv: list[str], storage: Storage, limit_bytes: int, deadline: float) -> None:
    """Run one buildah command (its output goes to the job's log), watching the time and the
    storage's size; raise _BuildFailed naming the step and why."""
    _say("%s: %s" % (what, " ".join(argv)))
    proc = subprocess.Popen(argv, env=build_env(storage), stdin=subprocess.DEVNULL)
    next_check = time.monotonic() + _USAGE_EVERY_S
    while True:
        try:
            rc = proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if now > deadline:
            n = _kill_tree()
            proc.wait()
            raise _BuildFailed("%s ran past the build's time-out; stopped (%d processes killed)" % (what, n))
        if now >= next_check:
            used = _usage(storage)
            next_check = time.monotonic() + _USAGE_EVERY_S
            if used > limit_bytes:
                n = _kill_tree()
                proc.wait()
                raise _BuildFailed("the build storage reached %d MB, over the limit of %d MB; stopped (%d processes "
                                   "killed) and the storage is wiped" % (used >> 20, limit_bytes >> 20, n))
    _kill_tree()        # whatever a RUN step left running in the background
    if rc != 0:
        raise _BuildFailed("%s failed (exit status %d); see the lines above" % (what, rc))


def _quiet(argv: list[str], storage: Storage) -> None:
    subprocess.run(argv, env=build_env(storage), capture_output=True, timeout=600, check=False)


def run_build(folder: Path) -> int:
    """The build job's work: bud, push, digest; the exit status of the job."""
    spec = BuildSpec.from_json((folder / "build.json").read_text())
    user = pwd.getpwuid(os.getuid()).pw_name
    target = parse_build_tag(spec.tag)
    storage = Storage(storage_dir(spec.storage, user), spec.storage_driver)
    limits = Limits(max_processes=spec.max_processes, max_file_bytes=spec.storage_limit_bytes,
                    storage_bytes=spec.storage_limit_bytes)
    deadline = time.monotonic() + spec.timeout_s
    started = time.monotonic()
    wipe = False
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    _say("build %d of %s as %s on %s (storage %s, at most %d MB and %d processes)"
         % (spec.build_id, target.name, user, os.uname().nodename, storage.base, spec.storage_limit_bytes >> 20,
            spec.max_processes))
    try:
        _prepare_storage(storage)
        if _usage(storage) > spec.storage_limit_bytes // 2:
            _say("the build storage holds more than half the limit: wiping it first")
            _quiet(wipe_argv(storage), storage)
            _prepare_storage(storage)
        _run_step("build", bud_argv(storage, spec.dockerfile, target, spec.context, spec.authfile, spec.insecure,
                                    limits), storage, spec.storage_limit_bytes, deadline)
        _say("built in %.1f s; pushing %s" % (time.monotonic() - started, target.name))
        part = spec.digestfile + ".part"
        _run_step("push", push_argv(storage, target, spec.authfile, part, spec.insecure), storage,
                  spec.storage_limit_bytes, deadline)
        digest = Path(part).read_text().strip()
        os.replace(part, spec.digestfile)
        _say("pushed %s in %.1f s" % (target.pinned(digest), time.monotonic() - started))
        return 0
    except _BuildFailed as e:
        wipe = "storage" in str(e)
        _say("build failed: %s" % e)
        return 1
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        _say("build failed: %s: %s" % (type(e).__name__, e))
        return 1
    finally:
        try:
            os.unlink(spec.authfile)
        except FileNotFoundError:
            pass
        _kill_tree()
        if wipe:
            _quiet(wipe_argv(storage), storage)
        else:
            _quiet(rmi_argv(storage, target), storage)
            _quiet(prune_argv(storage), storage)


def cmd_build_run(args) -> int:
    return run_build(Path(args.dir))


# -- the client ------------------------------------------------------------------------------------

def _ignore_patterns(context: Path) -> list[tuple[bool, str]]:
    """``.dockerignore``'s simple patterns: (negated, pattern), in order."""
    f = context / ".dockerignore"
    out = []
    if f.is_file():
        for line in f.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            neg = line.startswith("!")
            pat = line[1:].strip() if neg else line
            pat = pat.strip("/")
            if pat.startswith("./"):
                pat = pat[2:]
            if pat:
                out.append((neg, pat))
    return out


def ignored(rel: str, patterns: list[tuple[bool, str]]) -> bool:
    """Whether ``rel`` (a path in the context) is left out: the last matching pattern wins; a
    pattern matches the path or a folder above it (``**`` as ``*``, as fnmatch's ``*`` crosses /)."""
    out = False
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for neg, pat in patterns:
        pat = pat.replace("**/", "*").replace("**", "*")
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes):
            out = not neg
    return out


def pack_context(context: Path, dockerfile: Path, out) -> tuple[int, str]:
    """Write a tar of ``context`` (without what .dockerignore leaves out) to ``out``; the
    Dockerfile is included even when it lies outside the context (as ``.aiportal.Dockerfile``).
    Returns (files, the Dockerfile's path inside the tar)."""
    patterns = _ignore_patterns(context)
    ctx = context.resolve()
    df = dockerfile.resolve()
    try:
        df_rel = str(df.relative_to(ctx))
    except ValueError:
        df_rel = None
    count = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for top, dirs, files in os.walk(ctx):
            rel_top = os.path.relpath(top, ctx)
            dirs.sort()
            for name in list(dirs):
                rel = os.path.normpath(os.path.join(rel_top, name))
                if ignored(rel, patterns) and not _negated_below(rel, patterns):
                    dirs.remove(name)
            for name in sorted(files) + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
                rel = os.path.normpath(os.path.join(rel_top, name))
                if ignored(rel, patterns) and rel != df_rel:
                    continue
                info = tar.gettarinfo(os.path.join(top, name), arcname=rel)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if info.isreg():
                    with open(os.path.join(top, name), "rb") as f:
                        tar.addfile(info, f)
                elif info.issym():
                    tar.addfile(info)
                else:
                    continue
                count += 1
            for name in dirs:
                if os.path.islink(os.path.join(top, name)):
                    dirs.remove(name)
        if df_rel is None:
            info = tar.gettarinfo(str(df), arcname=".aiportal.Dockerfile")
            info.uid = info.gid = 0
            with open(df, "rb") as f:
                tar.addfile(info, f)
            df_rel = ".aiportal.Dockerfile"
            count += 1
    return count, df_rel


def _negated_below(rel: str, patterns) -> bool:
    return any(neg and pat.startswith(rel + "/") for neg, pat in patterns)


class _Progress(io.RawIOBase):
    """The tar being uploaded, read in blocks, with a progress line on stderr."""

    def __init__(self, f, size: int, quiet: bool):
        self.f, self.size, self.sent, self.quiet, self.last = f, size, 0, quiet, 0.0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n if n and n > 0 else 1 << 20)
        self.sent += len(data)
        now = time.monotonic()
        if not self.quiet and (now - self.last > 0.5 or not data):
            self.last = now
            print("\raiportal: uploading context %.1f / %.1f MB" % (self.sent / 1e6, self.size / 1e6),
                  end="" if data else "\n", file=sys.stderr, flush=True)
        return data


def _upload(args, path: str, f, size: int, quiet: bool) -> dict:
    """POST the tar (streamed from ``f``): ``_api`` sends JSON only, so this builds its request."""
    import http.client
    import urllib.error
    import urllib.request
    from portal.cli.client import _error_from, _token_and_source, urlopen
    url = args.url.rstrip("/") + "/api/v1" + path
    token, source = _token_and_source(args)
    req = urllib.request.Request(url, data=_Progress(f, size, quiet), method="POST", headers={
        "Authorization": "Bearer " + token, "Accept": "application/json", "Content-Type": "application/x-tar",
        "Content-Length": str(size)})
    try:
        with urlopen(args, req, timeout=max(args.timeout, 300)) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise _error_from(url, e, source) from None
    except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as e:
        raise PortalUnreachable("cannot upload the build context to %s (%s)" % (args.url, e)) from e


def follow_build_log(args, build_id: int, out=None, give_up_s: float | None = None) -> None:
    """Print the build's log as it grows (SSE, like job logs) until the build has ended,
    reconnecting from the last offset on a dropped stream."""
    out = out or sys.stdout
    give_up_s = args.reconnect_for if give_up_s is None else give_up_s
    last_id: str | None = None
    failing_since = None
    while True:
        offset = last_id if (last_id or "").isdigit() else "0"
        path = "/images/builds/%d/log?%s" % (build_id, urllib.parse.urlencode({"follow": "1", "offset": offset}))
        parser = SseParser(last_id)
        try:
            with _api(args, "GET", path, stream=True, headers={"Accept": "text/event-stream"}) as resp:
                while True:
                    chunk = resp.read1(64 * 1024)
                    if not chunk:
                        raise PortalUnreachable("the portal closed the log stream before the build ended")
                    failing_since = None
                    for ev in parser.feed(chunk):
                        if ev.event == "log":
                            out.write(json.loads(ev.data)["text"])
                            out.flush()
                        elif ev.event == "end":
                            return
                        elif ev.event == "denied":
                            raise CliError(denied_message(ev))
                    last_id = parser.last_id
        except ApiError as e:
            if not e.transient:
                raise
            reason = str(e)
        except (PortalUnreachable, TimeoutError, OSError) as e:
            reason = str(e)
        last_id = parser.last_id or last_id
        failing_since = failing_since or time.monotonic()
        if time.monotonic() - failing_since > give_up_s:
            raise CliError("lost the log of build %d (%s); see `aiportal image builds`" % (build_id, reason))
        time.sleep(1.0)


def cmd_image_build(args) -> int:
    context = Path(args.context)
    if not context.is_dir():
        raise CliError("the build context %s is not a folder" % context)
    dockerfile = Path(args.file) if args.file else context / "Dockerfile"
    if not dockerfile.is_file():
        raise CliError("no Dockerfile at %s (give one with -f FILE)" % dockerfile)
    try:
        parse_build_tag(args.tag)
    except ContainerError as e:
        raise CliError("--tag: %s" % e) from None
    import tempfile
    with tempfile.TemporaryFile() as spool:
        files, df_rel = pack_context(context, dockerfile, spool)
        size = spool.tell()
        spool.seek(0)
        if not args.quiet:
            print("aiportal: context %s: %d files, %.1f MB" % (context, files, size / 1e6), file=sys.stderr)
        query = urllib.parse.urlencode({"tag": args.tag, "dockerfile": df_rel})
        build = _upload(args, "/images/build?" + query, spool, size, args.quiet)
    print("aiportal: build %d of %s submitted (Slurm job %s)" % (build["id"], build["tag"], build["slurm_job_id"]),
          file=sys.stderr)
    if args.detach:
        print(build["id"])
        return 0
    follow_build_log(args, build["id"])
    deadline = time.monotonic() + 60
    while True:
        build = _api(args, "GET", "/images/builds/%d" % build["id"])
        if build["state"] in ("PUSHED", "FAILED", "CANCELLED") or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if build["state"] != "PUSHED":
        print("aiportal: build %d %s%s" % (build["id"], build["state"],
                                           (": " + build["message"]) if build["message"] else ""), file=sys.stderr)
        return 1
    print(build["pinned"])
    return 0


def cmd_image_builds(args) -> int:
    ans = _api(args, "GET", "/images/builds")
    if args.json:
        _print_json(ans)
        return 0
    print("%-5s %-10s %-16s %-45s %s" % ("ID", "STATE", "CREATED", "TAG", "DIGEST / MESSAGE"))
    for b in ans["builds"]:
        print("%-5d %-10s %-16s %-45s %s" % (b["id"], b["state"], _when(b["created_at"]), b["tag"],
                                              b["digest"] or b["message"][:80]))
    return 0


def cmd_image_build_cancel(args) -> int:
    build = _api(args, "DELETE", "/images/builds/%d" % args.build)
    print("aiportal: build %d %s" % (build["id"], build["state"]), file=sys.stderr)
    return 0

"""The `aiportal` command line.

Jobs, through the portal's JSON API (like any other client):

    aiportal submit --image SIF|REF --node-type 1card|4card [--input URI]... [--output URI]
                    [--time T] [--name N] [--env K=V]... [--gpus N] [--sweep NAME=V1,V2]...
                    [--project P] [--follow] [--json] -- CMD [ARG...]
                                                 submit; prints the job id (--follow: its log,
                                                 then exits with the job's exit code)
    aiportal jobs [--state S]... [--limit N] [--all-pages] [--json]
    aiportal show JOB [--json | --script]        one job and its timeline (or its batch script)
    aiportal logs [-f] JOB [--offset N] [--task T]
                                                 the log; -f follows it until the job has ended
    aiportal cancel JOB [--json]
    aiportal cluster [--json]                    partitions and nodes
    aiportal token create [--name N] [--expires-days D] | list | revoke ID
                                                 the caller's own API tokens
    aiportal service deploy NAME --image SIF --model URI [--model-file F] [--class C] [--version V]
                    [--replicas N | --min N --max N] [--target-inflight X] [--gpus N] [--wait]
    aiportal service list | show NAME | delete NAME
    aiportal service scale NAME (--replicas N | --min N --max N) [--target-inflight X]
    aiportal service update NAME [--model URI] [--image SIF] [--version V] ... [--weight PERCENT] [--wait]
                                                 inference services behind POST|PUT /service/NAME

JOB is a job id, a unique prefix of one (as `jobs` shows it), or a Slurm job id.

On the node, from the public site settings (/etc/aiportal/site.toml):

    aiportal script --image SIF --node-type 1card|4card [--input URI]... [--output URI]
                    [--time T] [--name N] [--env K=V]... -- CMD [ARG...]
                                                 print the exact batch script, to edit and sbatch
    aiportal image convert REF                   convert to SIF in the shared cache; prints the path
    aiportal image list [--json]                 cached images, sizes, last use
    aiportal stage in --from URI --to DIR [--missing-ok] [--credentials FILE] [--workers N]
                    [--bandwidth-mbps MBIT_S]
    aiportal stage out --from DIR --to URI [--credentials FILE] ...
                                                 move data inside a job (run by the batch script)

On every node, as root (Slurm's HealthCheckProgram runs `aiportal-healthcheck`, the same):

    aiportal health check [--node NAME] [--dry-run] [--json] [--all] [--timeout S]
    aiportal dev fail-node NAME --mode gpu|disk|slurmd|hang | --heal   (dev cluster only)

On the portal host, as root, straight on the database (portal.toml, --config):

    aiportal db upgrade | reconcile | router | monitor
    aiportal user add NAME --unix-user U [--admin] [--email ADDR] [--password-file F | --password-stdin] [--exists-ok]
    aiportal user list [--json] | passwd NAME (--password-file F | --password-stdin) | disable NAME | enable NAME
    aiportal token create --user NAME [--name N] [--expires-days D]   prints only the token
    aiportal token list --user NAME | revoke ID --user NAME
    aiportal project add NAME [--slurm-account A] [--member USER]... [--exists-ok]

Passwords are read from a file or stdin, never from the command line, and never printed.

The API token comes from --token-file, else $AIPORTAL_TOKEN, else ~/.config/aiportal/token;
the portal URL from --url, else $AIPORTAL_URL, else http://127.0.0.1:8000. Every error is
printed as ``aiportal: MESSAGE`` and exits with status 2.
"""
from __future__ import annotations

import argparse
import codecs
import datetime as dt
import getpass
import http.client
import json
import logging
import os
import shlex
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from portal import __version__

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TOKEN_FILE = Path.home() / ".config" / "aiportal" / "token"
#: how to get a token, said with every 401
TOKEN_HELP = ("get a token on the portal's Tokens page, or have an admin run `aiportal token create --user NAME` "
              "on the portal host; then pass --token-file FILE or set AIPORTAL_TOKEN")


class CliError(Exception):
    """A failure the user can act on: printed as ``aiportal: MESSAGE``, exit status 2."""


class PortalUnreachable(CliError):
    """No HTTP answer at all (connection refused or dropped, timeout)."""


class ApiError(CliError):
    """The portal answered with an error: its status, code, message and invalid fields."""

    def __init__(self, status: int, code: str, message: str, errors: dict[str, str] | None = None):
        self.status, self.code, self.detail, self.errors = status, code, message, dict(errors or {})
        lines = [message]
        # a validation message usually says "field: why" for each field already; add the rest
        lines += ["  %s: %s" % (f, m) for f, m in self.errors.items() if "%s: %s" % (f, m) not in message]
        super().__init__("\n".join(lines))

    @property
    def transient(self) -> bool:
        """Worth trying again: the portal is overloaded or cannot reach Slurm or the log host."""
        return self.status in (429, 502, 503, 504)


# -- HTTP: every API call goes through _api ------------------------------------------------------

def _token_and_source(args) -> tuple[str, str]:
    if args.token_file:
        path = Path(args.token_file)
    elif os.environ.get("AIPORTAL_TOKEN"):
        return _checked_token(os.environ["AIPORTAL_TOKEN"].strip(), "$AIPORTAL_TOKEN"), "$AIPORTAL_TOKEN"
    else:
        path = DEFAULT_TOKEN_FILE
    try:
        return _checked_token(path.read_text().strip(), str(path)), str(path)
    except (OSError, UnicodeDecodeError) as e:
        raise CliError("cannot read the API token from %s (%s); pass --token-file FILE or set "
                       "AIPORTAL_TOKEN (%s)" % (path, getattr(e, "strerror", None) or e, TOKEN_HELP)) from e


def _checked_token(token: str, source: str) -> str:
    # never echo it: a token is a password
    if not token or not token.isprintable() or any(c.isspace() for c in token):
        raise CliError("the API token from %s is empty or more than one word; it should be the one line "
                       "that `aiportal token create` printed" % source)
    return token


def _error_from(url: str, e: urllib.error.HTTPError, token_source: str) -> ApiError:
    """The API's JSON error body (``{"error", "message", "errors"?}``) as an ApiError."""
    try:
        raw = e.read()
    except (OSError, http.client.HTTPException):
        raw = b""
    finally:
        e.close()
    try:
        body = json.loads(raw)
        code, message, errors = str(body.get("error") or "error"), str(body.get("message") or ""), body.get("errors")
    except (ValueError, AttributeError):
        code, message, errors = "http_%d" % e.code, "", None
    if not message:
        text = raw.decode("utf-8", "replace").strip()
        if text.startswith("<"):      # an HTML error page: not this API answering
            text = "" if e.code != 404 else ("not the aiportal API: is --url the portal, and does it run this "
                                             "version of aiportal?")
        message = "%s answered %d %s%s" % (url, e.code, e.reason, (": " + text[:300]) if text else "")
    if e.code == 401:
        message = "the portal at %s refused the API token from %s: %s\n%s" % (
            url.split("/api/")[0], token_source, message, TOKEN_HELP)
    return ApiError(e.code, code, message, errors if isinstance(errors, dict) else None)


def _api(args, method: str, path: str, body: dict | None = None, stream: bool = False,
         headers: dict[str, str] | None = None):
    """One call to ``/api/v1{path}``: a JSON body in (if any); the decoded JSON out (None for
    204), or with ``stream`` the open response (the caller closes it). Raises ApiError for an
    error answer and PortalUnreachable when there is no answer."""
    url = args.url.rstrip("/") + "/api/v1" + path
    token, source = _token_and_source(args)
    hdrs = {"Authorization": "Bearer " + token, "Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        resp = urllib.request.urlopen(req, timeout=args.timeout)
    except urllib.error.HTTPError as e:
        raise _error_from(url, e, source) from None
    except urllib.error.URLError as e:
        raise PortalUnreachable("cannot reach the portal at %s (%s); is it running? (`make run`; or pass --url / "
                                "set AIPORTAL_URL)" % (args.url, e.reason)) from e
    except (TimeoutError, OSError, http.client.HTTPException) as e:
        raise PortalUnreachable("no answer from the portal at %s (%s: %s; --timeout is %gs)"
                                % (args.url, type(e).__name__, e, args.timeout)) from e
    except ValueError as e:     # a URL urllib cannot use
        raise CliError("cannot call %s: %s (check --url)" % (url, e)) from e
    if stream:
        return resp
    try:
        with resp:
            raw = resp.read()
    except (TimeoutError, OSError, http.client.HTTPException) as e:
        raise PortalUnreachable("the portal at %s dropped the answer to %s %s (%s: %s)"
                                % (args.url, method, path, type(e).__name__, e)) from e
    if resp.status == 204 or not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError as e:
        raise CliError("%s %s answered with something that is not JSON: %r" % (method, url, raw[:200])) from e


def _print_json(value) -> None:
    json.dump(value, sys.stdout, indent=2)
    print()


def _when(iso: str | None, seconds: bool = False) -> str:
    """An API timestamp in local time, or '-'."""
    if not iso:
        return "-"
    try:
        t = dt.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def cmd_cluster(args) -> int:
    view = _api(args, "GET", "/cluster")
    if args.json:
        _print_json(view)
        return 0
    print("cluster %s: %d of %d GPUs in use" % (view["cluster"], view["gpus_used"], view["gpus"]))
    print("%-12s %-8s %-12s %s" % ("PARTITION", "GPUS", "MAXTIME", "NODES"))
    for p in view["partitions"]:
        print("%-12s %-8s %-12s %s" % (p["name"] + ("*" if p["default"] else ""),
                                       "%d/%d" % (p["gpus_used"], p["gpus"]), p["max_time"], ",".join(p["nodes"])))
    print()
    print("%-8s %-12s %-10s %-8s %s" % ("NODE", "PARTITIONS", "STATE", "GPUS", "REASON"))
    for n in view["nodes"]:
        state = n["state"] + ("" if n["responding"] else "*")
        print("%-8s %-12s %-10s %-8s %s" % (n["name"], ",".join(n["partitions"]), state,
                                            "%d/%d" % (n["gpus_used"], n["gpus"]), n["reason"]))
    return 0


def _site_settings():
    from portal.settings import Settings
    return Settings.load(require_secrets=False)


def _parse_env(items: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError("--env %r: write it as NAME=VALUE" % item)
        out.append((key, value))
    return tuple(out)


def cmd_script(args) -> int:
    from portal.services.training import TrainingRequest, job_dir_for, render_request
    from slurm.errors import SpecError
    command = _command_of(args, "script")
    image = args.image
    if not image.startswith("/") or not image.endswith(".sif"):
        image = _cached_image(args.image)
    req = TrainingRequest(user=getpass.getuser(), image_sif=image, node_type=args.node_type,
                          command=tuple(command), name=args.name, inputs=tuple(args.input),
                          output=args.output, time_limit=args.time, env=_parse_env(args.env),
                          credentials=os.path.abspath(args.credentials) if args.credentials else None)
    if any(u.startswith("s3://") for u in list(args.input) + [args.output or ""]) and not args.credentials:
        raise CliError("s3:// locations need your data-source keys: write them to a file only you can read "
                       "(format: docs/storage.md) and pass --credentials FILE")
    settings = _site_settings()
    try:
        text = render_request(settings, req)
    except SpecError as e:
        raise CliError(str(e)) from e
    sys.stdout.write(text)
    print("# before sbatch, create the job's log folder: mkdir -p %s"
          % shlex.quote(str(job_dir_for(settings, req.user, req.job_id) / "logs")), file=sys.stderr)
    return 0


def _cached_image(ref: str) -> str:
    from containers.cache import SifCache
    from containers.errors import ContainerError
    from containers.refs import parse_image_ref
    settings = _site_settings()
    try:
        parsed = parse_image_ref(ref)
        hit = SifCache(settings.image_cache).lookup(parsed)
    except ContainerError as e:
        raise CliError(str(e)) from e
    if hit is None:
        raise CliError("image %s is not converted yet; run `aiportal image convert %s` first" % (ref, ref))
    return str(hit)


def cmd_image_convert(args) -> int:
    from containers.cache import SifCache
    from containers.errors import ContainerError
    from containers.refs import parse_image_ref
    logging.basicConfig(level=logging.INFO, format="[aiportal image] %(message)s")
    settings = _site_settings()
    cache_root = Path(args.cache or settings.image_cache)
    if not os.access(cache_root, os.W_OK):
        raise CliError("the image cache %s is written only by %s (and root); submit jobs through the "
                       "portal, which converts images for you" % (cache_root, settings.image_builder_user))
    try:
        sif = SifCache(cache_root).ensure(parse_image_ref(args.ref),
                                          progress=lambda msg: print("[aiportal image] %s" % msg, file=sys.stderr))
    except ContainerError as e:
        raise CliError(str(e)) from e
    print(sif)
    return 0


def cmd_image_list(args) -> int:
    import datetime

    from containers.cache import SifCache
    settings = _site_settings()
    entries = SifCache(Path(args.cache or settings.image_cache)).entries()
    if args.json:
        json.dump([{"digest": e.digest, "path": str(e.path), "size_bytes": e.size_bytes,
                    "last_used": e.last_used, "refs": list(e.refs)} for e in entries], sys.stdout, indent=2)
        print()
        return 0
    print("%-20s %10s %-20s %s" % ("DIGEST", "SIZE", "LAST USED", "REFERENCES"))
    for e in entries:
        used = datetime.datetime.fromtimestamp(e.last_used).strftime("%Y-%m-%d %H:%M") if e.last_used else "-"
        print("%-20s %9.1fM %-20s %s" % (e.digest[:19], e.size_bytes / 1e6, used, ", ".join(e.refs)))
    return 0


def cmd_stage(args) -> int:
    from storage.errors import StorageError
    from storage.stage import stage_in, stage_out
    logging.basicConfig(level=logging.INFO, format="[aiportal stage] %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    kw = dict(credentials=args.credentials, workers=args.workers, bandwidth_mbps=args.bandwidth_mbps,
              progress_every=args.progress_every)
    if args.retries is not None:
        from storage.retry import RetryPolicy
        from storage.transfer import TransferOptions
        kw["options"] = TransferOptions(retry=RetryPolicy(attempts=max(1, args.retries)))
    try:
        if args.direction == "in":
            stats = stage_in(args.source, args.dest, missing_ok=args.missing_ok, **kw)
        else:
            stats = stage_out(args.source, args.dest, pending_record=args.pending_record, **kw)
    except StorageError as e:
        raise CliError("stage %s: %s" % (args.direction, e)) from e
    except ValueError as e:
        raise CliError("stage %s: %s" % (args.direction, e)) from e
    print("[aiportal stage] %s %s -> %s: %s" % (args.direction, args.source, args.dest, stats.summary()), file=sys.stderr)
    return 0


def _portal_settings(args):
    """The portal's own settings (with secrets: root on the portal host)."""
    from portal.errors import ConfigError
    from portal.settings import Settings
    try:
        return Settings.load(getattr(args, "config", None))
    except ConfigError as e:
        raise CliError("%s (these commands run as root on the portal host)" % e) from e


def cmd_db_upgrade(args) -> int:
    from portal import db as dbmod
    settings = _portal_settings(args)
    engine = dbmod.make_engine(settings.database_url)
    before = dbmod.current_revision(engine)
    dbmod.upgrade(engine)
    after = dbmod.current_revision(engine)
    print("database schema: %s -> %s" % (before or "(empty)", after) if before != after
          else "database schema at %s (up to date)" % after)
    return 0


def cmd_reconcile(args) -> int:
    from portal import db as dbmod
    from portal.reconcile import Reconciler
    from slurm.backend import SlurmCli
    from storage.credentials import SecretBox
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _portal_settings(args)
    engine = dbmod.make_engine(settings.database_url)
    dbmod.check_schema(engine)
    rec = Reconciler(engine, SlurmCli(settings.slurm_conf, settings.slurm_timeout_s, settings.cluster_name),
                     settings, SecretBox(settings.data_key))
    if args.once:
        stats = rec.cycle()
        print("%d jobs, %d updated, %d adopted, %d resubmitted, %d external, %d Slurm calls, %.3fs"
              % (stats.jobs, stats.updated, stats.adopted, stats.resubmitted, stats.external, stats.slurm_calls,
                 stats.seconds))
        return 0
    rec.run(args.interval or settings.reconcile_interval_s)
    return 0


def cmd_router(args) -> int:
    from portal import db as dbmod
    from portal import router
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _portal_settings(args)
    engine = dbmod.make_engine(settings.database_url)
    dbmod.check_schema(engine)
    router.serve(settings, engine, args.listen or settings.router_listen)
    return 0


def _node_name(args) -> str:
    """--node, else the name Slurm gives HealthCheckProgram, else this host's short name."""
    import socket
    name = args.node or os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    if not name:
        raise CliError("give the node with --node NAME (Slurm sets SLURMD_NODENAME when it runs the check)")
    return name


def cmd_health_check(args) -> int:
    """Exit 0 healthy, 1 unhealthy (NHC's convention), 2 on a usage or settings error."""
    import faulthandler

    from monitor.health import format_report, run_health_check
    from monitor.probe import DEFAULT_PATH
    from portal.errors import ConfigError
    # Slurm runs HealthCheckProgram with no PATH; probes and Slurm's clients need one
    os.environ.setdefault("PATH", DEFAULT_PATH)
    logging.basicConfig(level=logging.WARNING, format="[aiportal health] %(message)s")
    try:
        settings = _site_settings()
        if args.timeout is not None:
            from dataclasses import replace
            settings = replace(settings, health_timeout_s=args.timeout,
                               health_probe_timeout_s=min(settings.health_probe_timeout_s, args.timeout / 2))
        config = settings.health_config()
    except ConfigError as e:
        raise CliError(str(e)) from e
    node = _node_name(args)
    # the last resort, even if a thread is stuck in C code: dump stacks and exit
    faulthandler.dump_traceback_later(config.timeout_s + 10, exit=True)
    report = run_health_check(config, node, dry_run=args.dry_run)
    faulthandler.cancel_dump_traceback_later()
    if args.json:
        _print_json(report.to_dict(all_failures=args.all))
    else:
        print(format_report(report, all_failures=args.all))
    return 0 if report.healthy else 1


def healthcheck_main() -> int:
    """``aiportal-healthcheck``: what Slurm's HealthCheckProgram runs (it passes no arguments)."""
    return main(["health", "check"] + sys.argv[1:])


def cmd_fail_node(args) -> int:
    from monitor.errors import FaultError
    from monitor.faults import heal, inject
    from portal.errors import ConfigError
    logging.basicConfig(level=logging.INFO, format="[aiportal dev] %(message)s")
    try:
        settings = _site_settings()
        config = settings.health_config()
    except ConfigError as e:
        raise CliError(str(e)) from e
    try:
        if args.heal:
            done = heal(config, args.node, args.mode)
        else:
            if not args.mode:
                raise CliError("give --mode gpu|disk|slurmd|hang (or --heal)")
            done = inject(config, args.node, args.mode)
    except FaultError as e:
        raise CliError(str(e)) from e
    for line in done:
        print(line)
    return 0


def cmd_monitor(args) -> int:
    from portal import db as dbmod
    from portal.recovery import HealthMonitor
    from slurm.backend import SlurmCli
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _portal_settings(args)
    engine = dbmod.make_engine(settings.database_url)
    dbmod.check_schema(engine)
    mon = HealthMonitor(engine, SlurmCli(settings.slurm_conf, settings.slurm_timeout_s, settings.cluster_name), settings)
    if args.once:
        stats = mon.cycle()
        print(stats.summary())
        return 0
    mon.run(args.interval or settings.monitor_interval_s)
    return 0


# -- Server-Sent Events (the log stream) ---------------------------------------------------------

@dataclass(frozen=True)
class SseEvent:
    event: str              #: "message" unless the server named it
    data: str               #: data lines joined with "\n"
    id: str | None          #: the last event id seen so far (ids persist across events)


class SseParser:
    """An incremental ``text/event-stream`` parser (the WHATWG rules): feed it bytes as they
    arrive, however split; it returns the events completed so far. Lines end with CRLF, LF or
    CR; ``:`` lines are comments (heartbeats); ``retry`` is kept in :attr:`retry_ms`. An event
    is dispatched at a blank line, and only if it had data. :attr:`last_id` (what to send as
    ``Last-Event-ID`` on a reconnect) changes only at a blank line, so an event cut off by a
    dropped connection is asked for again; it persists until an event sets another."""

    def __init__(self, last_id: str | None = None):
        self._buf = b""
        self._data: list[str] = []
        self._event = ""
        self._id = self.last_id = last_id
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buf += chunk
        out: list[SseEvent] = []
        while True:
            cut = self._line_end()
            if cut is None:
                return out
            end, skip = cut
            line = self._buf[:end].decode("utf-8", "replace")
            self._buf = self._buf[end + skip:]
            ev = self._line(line)
            if ev is not None:
                out.append(ev)

    def _line_end(self) -> tuple[int, int] | None:
        """(where the first complete line ends, length of its terminator), or None."""
        lf, cr = self._buf.find(b"\n"), self._buf.find(b"\r")
        if cr == -1 or (lf != -1 and lf < cr):
            return None if lf == -1 else (lf, 1)
        if cr + 1 == len(self._buf):
            return None             # a CR at the end: wait, an LF may follow in the next chunk
        return (cr, 2) if self._buf[cr + 1:cr + 2] == b"\n" else (cr, 1)

    def _line(self, line: str) -> SseEvent | None:
        if line == "":
            self.last_id = self._id
            if not self._data:
                self._event = ""
                return None
            ev = SseEvent(self._event or "message", "\n".join(self._data), self.last_id)
            self._data, self._event = [], ""
            return ev
        if line.startswith(":"):
            return None
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._id = value
        elif field == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None


def _log_text(ev: SseEvent) -> str:
    try:
        return str(json.loads(ev.data)["text"])
    except (ValueError, KeyError, TypeError) as e:
        raise CliError("the portal sent a log event this aiportal does not understand: %r" % ev.data[:200]) from e


#: read at most this much per socket read while following (SSE events are small)
_STREAM_READ = 64 * 1024


def follow_log(args, job_id: str, offset: int = 0, task: str | None = None, out=None,
               give_up_s: float | None = None, backoff_max_s: float = 10.0) -> int:
    """Write the job's log to ``out`` as it grows (``GET /jobs/ID/log?follow=1``, SSE) until the
    server sends ``end``; returns the byte offset reached.

    A dropped or silent connection (the server sends a heartbeat every few seconds, so a read
    that waits ``--timeout`` means it is gone), an unreachable portal or a 502/503/504 is
    retried with ``Last-Event-ID`` set to the last byte offset received, backing off up to
    ``backoff_max_s``; after ``give_up_s`` without getting anything through, CliError says
    where the log was left and how to resume."""
    out = out or sys.stdout
    give_up_s = args.reconnect_for if give_up_s is None else give_up_s
    query = {"follow": "1", "offset": str(offset)}
    if task is not None:
        query["task"] = task
    path = "/jobs/%s/log?%s" % (urllib.parse.quote(job_id, safe=""), urllib.parse.urlencode(query))
    last_id: str | None = None
    delay = None
    failing_since: float | None = None
    while True:
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        parser = SseParser(last_id)
        try:
            resp = _api(args, "GET", path, stream=True, headers=headers)
            with resp:
                while True:
                    chunk = resp.read1(_STREAM_READ)
                    if not chunk:
                        raise PortalUnreachable("the portal closed the log stream before the job ended")
                    failing_since, delay = None, None
                    for ev in parser.feed(chunk):
                        if ev.event == "log":
                            out.write(_log_text(ev))
                            out.flush()
                        elif ev.event == "end":
                            return int(parser.last_id) if (parser.last_id or "").isdigit() else offset
                    last_id = parser.last_id
        except ApiError as e:
            if not e.transient:
                raise
            reason = e
        except PortalUnreachable as e:
            reason = e
        except (TimeoutError, OSError, http.client.HTTPException) as e:
            reason = "%s: %s" % (type(e).__name__, e)
        last_id = parser.last_id
        now = time.monotonic()
        failing_since = failing_since or now
        at = last_id if (last_id or "").isdigit() else str(offset)
        if now - failing_since >= give_up_s:
            raise CliError("lost the log stream of job %s at byte %s and could not get it back for %.0f s "
                           "(last error: %s); resume with `aiportal logs -f %s --offset %s`"
                           % (job_id, at, give_up_s, str(reason).splitlines()[0], job_id, at))
        if delay is None:
            delay = (parser.retry_ms or 1000) / 1000.0
        else:
            delay = min(backoff_max_s, delay * 2)
        delay = min(delay, max(0.05, give_up_s - (now - failing_since)))
        print("aiportal: log stream of job %s interrupted at byte %s (%s); reconnecting in %.1f s"
              % (job_id, at, str(reason).splitlines()[0], delay), file=sys.stderr)
        time.sleep(delay)


# -- jobs over the API --------------------------------------------------------------------------

def _jpath(job_id: str, rest: str = "") -> str:
    return "/jobs/%s%s" % (urllib.parse.quote(job_id, safe=""), rest)


def _list_jobs(args, states=(), limit: int = 50, all_pages: bool = False) -> dict:
    """GET /jobs, one page or (``all_pages``) every page merged into one answer."""
    page = min(limit, 500) if not all_pages else 500
    jobs: list[dict] = []
    offset, total = 0, 0
    while True:
        query = [("limit", str(page)), ("offset", str(offset))] + [("state", s) for s in states]
        ans = _api(args, "GET", "/jobs?" + urllib.parse.urlencode(query))
        jobs += ans["jobs"]
        total = ans["total"]
        offset += len(ans["jobs"])
        if not all_pages or not ans["jobs"] or offset >= total:
            return {"total": total, "limit": len(jobs) if all_pages else ans["limit"], "offset": 0, "jobs": jobs}


def _resolve_job(args, ref: str) -> str:
    """A full job id from a full id, a unique prefix (what `jobs` shows) or a Slurm job id."""
    ref = ref.strip()
    if len(ref) == 36 or not ref:
        return ref
    jobs = _list_jobs(args, all_pages=True)["jobs"]
    hits = [j["id"] for j in jobs if j["id"].startswith(ref)]
    if not hits and ref.isdigit():
        hits = [j["id"] for j in jobs if j.get("slurm_job_id") == ref]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise CliError("no job of yours has an id starting with %r (or Slurm job id %s); see `aiportal jobs`"
                       % (ref, ref))
    raise CliError("%r matches %d jobs (%s); give more of the id"
                   % (ref, len(hits), ", ".join(h[:13] for h in hits[:5])))


def _job_sweep(items: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not vals:
            raise CliError("--sweep %r: write it as NAME=V1,V2,..." % item)
        grid[key.strip()] = vals
    return grid


def _command_of(args, verb: str) -> list[str]:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise CliError("give the command after --, e.g. aiportal %s ... -- python3 train.py" % verb)
    return list(command)


def _exit_status(job: dict) -> int:
    """The shell exit status for a finished job: 0 when it completed, else its exit code (1
    when it has none, e.g. cancelled or timed out)."""
    from slurm.states import JobState
    if JobState(job["state"]) is JobState.COMPLETED:
        return 0
    return job.get("exit_code") or 1


def _follow_to_end(args, job_id: str, offset: int = 0, task: str | None = None) -> dict:
    """Follow the log until the job has ended; the job as the API has it then."""
    follow_log(args, job_id, offset, task)
    job = _api(args, "GET", _jpath(job_id))
    code = "" if job.get("exit_code") is None else ", exit code %d" % job["exit_code"]
    print("aiportal: job %s ended: %s%s%s" % (job_id, job["state"], code,
                                            (" (%s)" % job["reason"]) if job.get("reason") else ""), file=sys.stderr)
    return job


def cmd_submit(args) -> int:
    image = args.image
    if ":" not in image and not image.startswith("/") and os.path.exists(image):
        image = os.path.abspath(image)      # the portal resolves paths on its host, not in our cwd
    body = {"image": image, "node_type": args.node_type, "command": _command_of(args, "submit"),
            "name": args.name, "inputs": list(args.input), "output": args.output, "time_limit": args.time,
            "env": dict(_parse_env(args.env)), "gpus": args.gpus, "sweep": _job_sweep(args.sweep),
            "project": args.project}
    job = _api(args, "POST", "/jobs", body)
    if args.json:
        _print_json(job)
    elif not args.follow:
        print(job["id"])
    if args.follow:
        print("aiportal: submitted job %s (Slurm job %s); following its log" % (job["id"], job["slurm_job_id"]),
              file=sys.stderr)
        return _exit_status(_follow_to_end(args, job["id"]))
    return 0


def cmd_jobs(args) -> int:
    ans = _list_jobs(args, [s.upper() for s in args.state], args.limit, args.all_pages)
    if args.json:
        _print_json(ans)
        return 0
    print("%-8s %-20s %-11s %-8s %-12s %s" % ("ID", "NAME", "STATE", "SLURM", "NODES", "CREATED"))
    for j in ans["jobs"]:
        print("%-8s %-20s %-11s %-8s %-12s %s" % (j["id"][:8], j["name"][:20], j["state"], j["slurm_job_id"] or "-",
                                                  j["nodes"] or "-", _when(j["created_at"])))
    if len(ans["jobs"]) < ans["total"]:
        print("(%d of %d jobs; --limit N or --all-pages for more)" % (len(ans["jobs"]), ans["total"]), file=sys.stderr)
    return 0


def cmd_show(args) -> int:
    job = _api(args, "GET", _jpath(_resolve_job(args, args.job)))
    if args.json:
        _print_json(job)
        return 0
    if args.script:
        sys.stdout.write(job.get("script") or "")
        if not job.get("script"):
            print("aiportal: job %s has no batch script yet (state %s)" % (job["id"], job["state"]), file=sys.stderr)
        return 0
    req = job.get("request") or {}
    rows = [
        ("job", job["id"]), ("name", job["name"]), ("owner", job.get("owner") or "-"),
        ("state", job["state"] + (" (%s)" % job["reason"] if job.get("reason") else "")),
        ("exit code", "-" if job.get("exit_code") is None else str(job["exit_code"])),
        ("slurm job", (job.get("slurm_job_id") or "-") + (" (submitted with sbatch)" if job.get("external") else "")),
        ("node type", "%s on %s, %s GPU(s)" % (job.get("node_type") or "-", job.get("partition") or "-",
                                                job.get("gpus"))),
        ("nodes", job.get("nodes") or "-"), ("image", job.get("image") or "-"),
        ("command", shlex.join(req["command"]) if isinstance(req.get("command"), list) else "-"),
    ]
    for key, label in (("inputs", "inputs"), ("output", "output"), ("time_limit", "time limit"),
                       ("sweep", "sweep"), ("project", "project")):
        value = req.get(key)
        if value:
            rows.append((label, ", ".join(value) if isinstance(value, list) else
                         "; ".join("%s=%s" % (k, ",".join(map(str, v))) for k, v in value.items())
                         if isinstance(value, dict) else str(value)))
    if job.get("restarts"):
        rows.append(("restarts", str(job["restarts"])))
    if job.get("stage_out_pending"):
        rows.append(("stage out", "PENDING: outputs kept at %s" % ", ".join(map(str, job["stage_out_pending"]))))
    for key in ("created_at", "submitted_at", "started_at", "ended_at"):
        rows.append((key.replace("_at", ""), _when(job.get(key), seconds=True)))
    for label, value in rows:
        print("%-11s %s" % (label, value))
    print()
    print("timeline:")
    for ev in job.get("events", []):
        print("  %s  %-13s %-10s %s%s" % (_when(ev["at"], seconds=True), ev["kind"], ev.get("state") or "",
                                          ev["message"], (" [%s]" % ev["node"]) if ev.get("node") else ""))
    return 0


def cmd_logs(args) -> int:
    job_id = _resolve_job(args, args.job)
    if args.follow:
        _follow_to_end(args, job_id, args.offset, args.task)
        return 0
    offset = args.offset
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        query = {"offset": str(offset)}
        if args.task is not None:
            query["task"] = args.task
        resp = _api(args, "GET", _jpath(job_id, "/log?" + urllib.parse.urlencode(query)), stream=True,
                    headers={"Accept": "text/plain"})
        try:
            with resp:
                data = resp.read()
                nxt = resp.headers.get("X-Log-Offset")
        except (TimeoutError, OSError, http.client.HTTPException) as e:
            raise PortalUnreachable("the portal at %s dropped the log of job %s at byte %d (%s)"
                                    % (args.url, job_id, offset, e)) from e
        sys.stdout.write(decoder.decode(data))
        if not data:
            break
        offset = int(nxt) if nxt and nxt.isdigit() else offset + len(data)
    sys.stdout.write(decoder.decode(b"", final=True))
    sys.stdout.flush()
    return 0


def cmd_cancel(args) -> int:
    job_id = _resolve_job(args, args.job)
    job = _api(args, "POST", _jpath(job_id, "/cancel"))
    if args.json:
        _print_json(job)
    else:
        print("cancel requested for job %s (Slurm job %s)" % (job["id"], job.get("slurm_job_id") or "-"))
    return 0


# -- admin: accounts straight on the database (root on the portal host) -------------------------

@contextmanager
def _admin_db(args) -> Iterator:
    """A session on the portal's database (settings from --config), committed at the end;
    the services' errors (invalid, conflict, not found) become CliError."""
    import sqlalchemy as sa

    from portal import db as dbmod
    from portal.errors import PortalError
    settings = _portal_settings(args)
    try:
        engine = dbmod.make_engine(settings.database_url)
    except PortalError as e:
        raise CliError(str(e)) from e
    try:
        dbmod.check_schema(engine)
        with dbmod.session_scope(engine) as session:
            yield session
    except PortalError as e:
        raise CliError(str(e)) from e
    except sa.exc.SQLAlchemyError as e:
        raise CliError("database %s: %s" % (dbmod._safe_url(settings.database_url), e.__class__.__name__ + ": "
                                            + str(e).splitlines()[0])) from e
    finally:
        engine.dispose()


def _read_password(args) -> str | None:
    """The password from --password-file or --password-stdin (one line; the line end is not part
    of it), or None when neither was given. Never from argv, never echoed."""
    if getattr(args, "password_file", None):
        try:
            text = Path(args.password_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise CliError("cannot read the password from %s (%s)" % (args.password_file, e)) from e
        source = args.password_file
    elif getattr(args, "password_stdin", False):
        if sys.stdin.isatty():
            text = getpass.getpass("password: ")
            if getpass.getpass("again: ") != text:
                raise CliError("the two passwords differ")
        else:
            text = sys.stdin.read()
        source = "stdin"
    else:
        return None
    password = text[:-1] if text.endswith("\n") else text
    password = password[:-1] if password.endswith("\r") else password
    if "\n" in password or "\r" in password:
        raise CliError("the password from %s has more than one line" % source)
    if not password:
        raise CliError("the password from %s is empty" % source)
    return password


def cmd_user_add(args) -> int:
    from sqlmodel import select
    from werkzeug.security import check_password_hash

    from portal.models import User
    from portal.services import accounts
    password = _read_password(args)
    with _admin_db(args) as db:
        accounts.check_unix_user(args.unix_user)
        user = db.exec(select(User).where(User.name == args.name)).first()
        if user is None:
            user = accounts.add_user(db, args.name, args.unix_user, password, admin=bool(args.admin),
                                     email=args.email)
            print("added user %s (Unix user %s%s%s)" % (user.name, user.unix_user, ", admin" if user.is_admin else "",
                                                       "" if password else "; API tokens only, no password"))
            return 0
        if not args.exists_ok:
            raise CliError("user %r already exists (add --exists-ok to leave it, or update its admin flag and "
                           "password, in place)" % args.name)
        if user.unix_user != args.unix_user:
            raise CliError("user %r exists mapped to Unix user %r, not %r; a user's Unix account is not changed "
                           "in place" % (args.name, user.unix_user, args.unix_user))
        changes = []
        if args.admin is not None and user.is_admin != args.admin:
            user.is_admin = args.admin
            db.add(user)
            changes.append("admin" if args.admin else "no longer admin")
        if password is not None and not (user.password_hash and check_password_hash(user.password_hash, password)):
            accounts.set_password(db, user, password)
            changes.append("password set")
        if args.email is not None and (user.email or "") != args.email:
            user.email = accounts.check_email(args.email)
            db.add(user)
            changes.append("email %s" % (user.email or "removed"))
        print("user %s exists: %s%s" % (user.name, ", ".join(changes) or "unchanged",
                                        " (disabled; `aiportal user enable %s`)" % user.name if user.disabled else ""))
    return 0


def cmd_user_list(args) -> int:
    from portal.models import ApiToken, utcnow
    from portal.services import accounts
    from sqlmodel import select
    with _admin_db(args) as db:
        users = accounts.list_users(db)
        now = utcnow()
        live: dict[int, int] = {}
        for t in db.exec(select(ApiToken).where(ApiToken.revoked_at.is_(None))):
            if t.expires_at is None or t.expires_at > now:
                live[t.user_id] = live.get(t.user_id, 0) + 1
        rows = [{"name": u.name, "unix_user": u.unix_user, "is_admin": u.is_admin, "disabled": u.disabled,
                 "has_password": bool(u.password_hash), "tokens": live.get(u.id, 0),
                 "created_at": u.created_at.isoformat()} for u in users]
    if args.json:
        _print_json(rows)
        return 0
    print("%-20s %-12s %-6s %-9s %-9s %-7s %s" % ("NAME", "UNIX USER", "ADMIN", "DISABLED", "PASSWORD", "TOKENS",
                                                 "CREATED"))
    for r in rows:
        print("%-20s %-12s %-6s %-9s %-9s %-7d %s"
              % (r["name"], r["unix_user"] or "-", "yes" if r["is_admin"] else "", "yes" if r["disabled"] else "",
                 "yes" if r["has_password"] else "no", r["tokens"], _when(r["created_at"])))
    return 0


def cmd_user_passwd(args) -> int:
    from portal.services import accounts
    password = _read_password(args)
    with _admin_db(args) as db:
        accounts.set_password(db, accounts.get_user(db, args.name), password)
    print("password of %s changed (its web sessions end)" % args.name)
    return 0


def cmd_user_disable(args) -> int:
    from portal.services import accounts
    with _admin_db(args) as db:
        user = accounts.get_user(db, args.name)
        was = user.disabled
        user.disabled = args.disable
        db.add(user)
    if args.disable:
        print("user %s %s (its tokens and web sessions no longer work)" % (args.name, "stays disabled" if was
                                                                          else "disabled"))
    else:
        print("user %s %s" % (args.name, "enabled" if was else "was not disabled"))
    return 0


def _token_rows(tokens) -> list[dict]:
    return [{"id": t.id, "name": t.name, "prefix": t.prefix, "created_at": t.created_at.isoformat(),
             "last_used_at": t.last_used_at.isoformat() if t.last_used_at else None,
             "expires_at": t.expires_at.isoformat() if t.expires_at else None,
             "revoked": t.revoked_at is not None} for t in tokens]


def cmd_token_create(args) -> int:
    if args.user:
        from portal.services import accounts
        with _admin_db(args) as db:
            user = accounts.get_user(db, args.user)
            if user.disabled:
                raise CliError("user %s is disabled; `aiportal user enable %s` first" % (user.name, user.name))
            token, rec = accounts.create_token(db, user, args.name or "", args.expires_days)
            rec_id, expires = rec.id, rec.expires_at
    else:
        ans = _api(args, "POST", "/tokens", {"name": args.name or "", "expires_days": args.expires_days})
        token, rec_id, expires = ans["token"], ans["id"], None
    print(token)
    sys.stdout.flush()
    print("aiportal: token %s created%s; it is not shown again" % (
        rec_id, " (expires %s)" % _when(expires.isoformat()) if expires else ""), file=sys.stderr)
    return 0


def cmd_token_list(args) -> int:
    if args.user:
        from portal.services import accounts
        with _admin_db(args) as db:
            rows = _token_rows(accounts.list_tokens(db, accounts.get_user(db, args.user)))
    else:
        rows = _api(args, "GET", "/tokens")["tokens"]
    if args.json:
        _print_json(rows)
        return 0
    print("%-5s %-16s %-16s %-17s %-17s %-17s %s" % ("ID", "NAME", "PREFIX", "CREATED", "LAST USED", "EXPIRES",
                                                    "REVOKED"))
    for t in rows:
        print("%-5s %-16s %-16s %-17s %-17s %-17s %s" % (t["id"], t["name"][:16] or "-", t["prefix"] + "...",
                                                        _when(t["created_at"]), _when(t["last_used_at"]),
                                                        _when(t["expires_at"]), "yes" if t["revoked"] else ""))
    return 0


def cmd_token_revoke(args) -> int:
    if args.user:
        from portal.errors import NotFoundError
        from portal.models import ApiToken
        from portal.services import accounts
        with _admin_db(args) as db:
            user = accounts.get_user(db, args.user)
            rec = db.get(ApiToken, args.id)
            if rec is None or rec.user_id != user.id:
                raise NotFoundError("user %s has no token %d (`aiportal token list --user %s`)"
                                    % (user.name, args.id, user.name))
            accounts.revoke_token(db, user, args.id)
    else:
        _api(args, "DELETE", "/tokens/%d" % args.id)
    print("token %d revoked" % args.id)
    return 0


def cmd_project_add(args) -> int:
    from sqlmodel import select

    from portal.models import Project
    from portal.services import accounts
    with _admin_db(args) as db:
        members = [accounts.get_user(db, name) for name in args.member]
        project = db.exec(select(Project).where(Project.name == args.name)).first()
        if project is None:
            project = accounts.add_project(db, args.name, args.description or "", args.slurm_account)
            what = "added project %s" % project.name
        elif not args.exists_ok:
            raise CliError("project %r already exists (add --exists-ok to add members to it)" % args.name)
        else:
            if args.slurm_account is not None and project.slurm_account != args.slurm_account:
                project.slurm_account = args.slurm_account
                db.add(project)
            what = "project %s exists" % project.name
        for user in members:
            accounts.add_member(db, project, user)
    print("%s (Slurm account %s; members added: %s)" % (what, project.slurm_account or "-",
                                                        ", ".join(args.member) or "none"))
    return 0


# -- inference services (through the API) --------------------------------------------------------

_SPEC_ARGS = (("image", "image"), ("model", "model"), ("model_file", "model_file"), ("class_name", "class_name"),
              ("version", "version"), ("gpus", "gpus"), ("cpus", "cpus"), ("memory_mb", "memory_mb"),
              ("max_batch_size", "max_batch_size"), ("max_wait_ms", "max_wait_ms"),
              ("max_body_bytes", "max_body_bytes"))
_POLICY_ARGS = (("replicas", "replicas"), ("min_replicas", "min_replicas"), ("max_replicas", "max_replicas"),
                ("target_inflight", "target_inflight"), ("scale_down_delay", "scale_down_delay_s"))


def _fields(args, table) -> dict:
    return {key: getattr(args, attr) for attr, key in table if getattr(args, attr, None) is not None}


def _svc_path(name: str, rest: str = "") -> str:
    return "/services/%s%s" % (urllib.parse.quote(name, safe=""), rest)


def _print_service(svc: dict, url: str) -> None:
    spec = svc.get("spec") or {}
    rows = [("service", svc["name"]), ("url", "%s%s" % (url.rstrip("/"), svc["url"])),
            ("owner", svc.get("owner") or "-"), ("state", svc["state"]),
            ("version", "%s (generation %s)" % (spec.get("version"), svc.get("generation"))),
            ("image", spec.get("image", "-")), ("model", "%s (%s in %s)" % (spec.get("class_name"), spec.get("model_file"),
                                                                          spec.get("model"))),
            ("replicas", "%s ready, %s wanted (min %s, max %s; target %s in flight each)" % (
                svc.get("ready_replicas", "?"), svc["desired_replicas"], svc["min_replicas"], svc["max_replicas"],
                svc["target_inflight"])),
            ("batching", "up to %s per call, waiting at most %s ms" % (spec.get("max_batch_size"), spec.get("max_wait_ms")))]
    if svc.get("next_spec"):
        rows.append(("updating to", "version %s" % svc["next_spec"].get("version")))
    if svc.get("message"):
        rows.append(("message", svc["message"]))
    for label, value in rows:
        print("%-12s %s" % (label, value))
    if svc.get("replicas"):
        print()
        print("  %-8s %-10s %-8s %-8s %-21s %-9s %s" % ("REPLICA", "PHASE", "VERSION", "SLURM", "ENDPOINT", "IN FLIGHT",
                                                      "MESSAGE"))
        for r in svc["replicas"]:
            print("  %-8s %-10s %-8s %-8s %-21s %-9s %s" % (
                r["id"][:8], r["phase"], r["version"], r["slurm_job_id"] or "-",
                "%s:%s" % (r["host"], r["port"]) if r.get("port") else "-",
                "-" if r.get("avg_inflight") is None else "%.2f" % r["avg_inflight"], r.get("message") or ""))


def _wait_service(args, name: str, done, what: str) -> dict:
    deadline = time.monotonic() + args.wait_timeout
    while True:
        svc = _api(args, "GET", _svc_path(name))
        if done(svc):
            return svc
        if time.monotonic() > deadline:
            raise CliError("service %s: still no %s after %.0fs (`aiportal service show %s`)" % (name, what,
                                                                                              args.wait_timeout, name))
        time.sleep(1.0)


def cmd_service_deploy(args) -> int:
    body = {"name": args.name, **_fields(args, _SPEC_ARGS), **_fields(args, _POLICY_ARGS)}
    svc = _api(args, "POST", "/services", body)
    if args.wait:
        svc = _wait_service(args, args.name, lambda s: s["ready_replicas"] >= max(1, s["desired_replicas"]) or (
            "failed" in (s.get("message") or "")), "ready replicas")
        if svc["ready_replicas"] < 1:
            raise CliError("service %s: %s" % (args.name, svc.get("message")))
    if args.json:
        _print_json(svc)
    else:
        print("service %s deployed: POST or PUT %s%s (Authorization: Bearer TOKEN)" % (
            svc["name"], args.url.rstrip("/"), svc["url"]))
    return 0


def cmd_service_list(args) -> int:
    rows = _api(args, "GET", "/services")["services"]
    if args.json:
        _print_json(rows)
        return 0
    print("%-24s %-9s %-10s %-8s %-10s %s" % ("NAME", "STATE", "VERSION", "READY", "MIN-MAX", "URL"))
    for s in rows:
        print("%-24s %-9s %-10s %-8s %-10s %s" % (s["name"][:24], s["state"], str(s.get("version"))[:10],
                                                 "%s/%s" % (s.get("ready_replicas", 0), s["desired_replicas"]),
                                                 "%s-%s" % (s["min_replicas"], s["max_replicas"]), s["url"]))
    return 0


def cmd_service_show(args) -> int:
    svc = _api(args, "GET", _svc_path(args.name))
    if args.json:
        _print_json(svc)
    else:
        _print_service(svc, args.url)
    return 0


def cmd_service_scale(args) -> int:
    svc = _api(args, "POST", _svc_path(args.name, "/scale"), _fields(args, _POLICY_ARGS))
    if args.json:
        _print_json(svc)
    else:
        print("service %s: %s-%s replicas (now %s wanted)" % (svc["name"], svc["min_replicas"], svc["max_replicas"],
                                                             svc["desired_replicas"]))
    return 0


def cmd_service_update(args) -> int:
    body = _fields(args, _SPEC_ARGS)
    if args.weight is not None:
        body["weight"] = args.weight
    svc = _api(args, "POST", _svc_path(args.name, "/update"), body)
    target = (svc.get("next_spec") or {}).get("version")
    if args.wait and svc.get("next_weight") is not None:
        raise CliError("service %s: a gray release does not end by itself; --wait applies to rolling updates "
                       "(--weight 100)" % args.name)
    if args.wait and target is not None:
        svc = _wait_service(args, args.name, lambda s: s["state"] != "UPDATING", "end of the rolling update")
        if svc.get("version") != target:
            raise CliError("service %s: %s" % (args.name, svc.get("message")))
    if args.json:
        _print_json(svc)
    else:
        print("service %s: %s" % (svc["name"], svc.get("message") or "rolling update to version %s" % target))
    return 0


def cmd_service_delete(args) -> int:
    _api(args, "DELETE", _svc_path(args.name))
    print("service %s: deleting (its replicas are being stopped)" % args.name)
    return 0


def _add_spec_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--image", required=required, help="a .sif path on the shared filesystem")
    p.add_argument("--model", required=required, help="the model folder: s3://SOURCE/bucket/prefix or a shared path")
    p.add_argument("--model-file", help="the .py file in the model folder defining the class (default model.py)")
    p.add_argument("--class", dest="class_name", help="the model class (default Model)")
    p.add_argument("--version", help="a version label (default 1)")
    p.add_argument("--gpus", type=int, help="GPUs per replica (default 0)")
    p.add_argument("--cpus", type=int, help="CPUs per replica (default 1)")
    p.add_argument("--memory-mb", type=int, help="memory per replica (default 2000)")
    p.add_argument("--max-batch-size", type=int, help="requests per execute() call (default 8)")
    p.add_argument("--max-wait-ms", type=float, help="how long a batch waits to fill (default 5)")
    p.add_argument("--max-body-bytes", type=int, help="larger request bodies get 413 (default 16 MiB)")


def _add_policy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, help="a fixed number of replicas (min = max)")
    p.add_argument("--min", dest="min_replicas", type=int, help="autoscale from this many replicas")
    p.add_argument("--max", dest="max_replicas", type=int, help="... up to this many")
    p.add_argument("--target-inflight", type=float, help="requests in flight per replica to aim at (default 4)")
    p.add_argument("--scale-down-delay", type=float, metavar="SECONDS",
                   help="low load this long before a replica is removed (default 60)")


def _add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments `script` and `submit` share."""
    p.add_argument("--image", required=True, help="a .sif path, or an image reference (script: already converted)")
    p.add_argument("--node-type", required=True, help="1card, 4card (see /etc/aiportal/site.toml)")
    p.add_argument("--input", action="append", default=[], help="data to stage into /data/data (repeatable)")
    p.add_argument("--output", help="where /data/output is kept (and restored from on requeue)")
    p.add_argument("--time", default="01:00:00", help="time limit (default 01:00:00)")
    p.add_argument("--name", default="train", help="job name")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment (repeatable)")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="portal.toml (default: $AIPORTAL_CONFIG or /etc/aiportal/portal.toml)")


def _add_password(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--password-file", metavar="FILE", help="read the password from FILE (one line)")
    g.add_argument("--password-stdin", action="store_true", help="read the password from stdin (one line)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiportal", description="Slurm-backed AI training and inference portal")
    parser.add_argument("--version", action="version", version="aiportal %s" % __version__)
    parser.add_argument("--url", default=os.environ.get("AIPORTAL_URL", DEFAULT_URL), help="portal URL")
    parser.add_argument("--token-file", help="file holding the API token")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the portal")
    parser.add_argument("--reconnect-for", type=float, default=120.0, metavar="SECONDS",
                        help="logs -f, submit --follow: keep reconnecting a lost log stream this long (default 120)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cluster", help="partitions, nodes, their state and GPUs")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("submit", help="submit a training job through the portal; prints its id")
    _add_job_arguments(p)
    p.add_argument("--gpus", type=int, help="GPUs per node (default: all of the node type's)")
    p.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                   help="a parameter grid: one array task per combination, as environment variables (repeatable)")
    p.add_argument("--project", help="charge the job to this project")
    p.add_argument("--follow", "-f", action="store_true",
                   help="follow the log until the job ends; exit with the job's exit code")
    p.add_argument("--json", action="store_true", help="print the API's JSON of the new job")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="your jobs, newest first")
    p.add_argument("--state", action="append", default=[], help="only jobs in this state (repeatable)")
    p.add_argument("--limit", type=int, default=50, help="at most this many (1-500, default 50)")
    p.add_argument("--all-pages", action="store_true", help="every job, however many")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("show", help="one job: request, state, timeline")
    p.add_argument("job", help="job id (or a unique prefix, or its Slurm job id)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="print the API's JSON")
    g.add_argument("--script", action="store_true", help="print only the batch script that was submitted")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("logs", help="a job's log; -f follows it until the job ends")
    p.add_argument("job", help="job id (or a unique prefix, or its Slurm job id)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing as the log grows, until the job ends")
    p.add_argument("--offset", type=int, default=0, help="start at this byte of the log")
    p.add_argument("--task", help="array task (sweeps; default 0)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job", help="job id (or a unique prefix, or its Slurm job id)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("script", help="print the batch script the portal would submit")
    _add_job_arguments(p)
    p.add_argument("--credentials", metavar="FILE",
                   help="your data-source credentials file for s3:// locations (mode 0600; the job reads it, "
                        "the script carries only its path)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    p.set_defaults(func=cmd_script)

    p = sub.add_parser("image", help="convert images into the shared SIF cache, list it")
    isub = p.add_subparsers(dest="image_command", required=True)
    c = isub.add_parser("convert", help="convert REF to SIF (once per content digest); prints the SIF path")
    c.add_argument("ref", help="docker-archive:/x.tar, oci-archive:/x.tar, oci:/layout:tag, /x.def, /x.sif")
    c.add_argument("--cache", help="cache folder (default: image_cache from site.toml)")
    c.set_defaults(func=cmd_image_convert)
    c = isub.add_parser("list", help="cached images with sizes and last use")
    c.add_argument("--cache", help="cache folder (default: image_cache from site.toml)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_image_list)

    p = sub.add_parser("stage", help="move data in or out of a job (run inside jobs)")
    p.add_argument("direction", choices=["in", "out"])
    p.add_argument("--from", dest="source", required=True)
    p.add_argument("--to", dest="dest", required=True)
    p.add_argument("--missing-ok", action="store_true", help="stage in: a missing source is not an error")
    p.add_argument("--credentials", metavar="FILE",
                   help="data-source credentials for s3:// locations (the portal writes one into the job dir)")
    p.add_argument("--workers", type=int, help="concurrent requests for s3:// transfers (default 8, or the data source's)")
    p.add_argument("--bandwidth-mbps", type=float, metavar="MBIT_S",
                   help="cap s3:// transfers at this many megabits per second (a data source's own cap still "
                        "applies if lower)")
    p.add_argument("--retries", type=int, metavar="N",
                   help="tries per request on transient errors before giving up (default 6, ~15 s of backoff)")
    p.add_argument("--progress-every", type=float, metavar="SECONDS", help="seconds between progress lines (default 5)")
    p.add_argument("--pending-record", metavar="FILE",
                   help="stage out: where to record a stage-out that did not finish "
                        "(default: STAGE_OUT_PENDING.<dir>.json beside the directory)")
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("db", help="the portal's database (root, on the portal host)")
    dsub = p.add_subparsers(dest="db_command", required=True)
    c = dsub.add_parser("upgrade", help="create or migrate the schema to this version's")
    _add_config(c)
    c.set_defaults(func=cmd_db_upgrade)

    p = sub.add_parser("reconcile", help="keep the database in step with Slurm (started with the portal)")
    _add_config(p)
    p.add_argument("--interval", type=float, help="seconds between cycles (default: reconcile_interval_s)")
    p.add_argument("--once", action="store_true", help="run one cycle and print what it did")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("router", help="serve POST|PUT /service/NAME, the inference services' front door "
                                      "(started with the portal)")
    _add_config(p)
    p.add_argument("--listen", help="HOST:PORT or unix:PATH (default: router_listen)")
    p.set_defaults(func=cmd_router)

    p = sub.add_parser("monitor", help="recover jobs hit by node failures, record node events, notify owners "
                                       "(started with the portal)")
    _add_config(p)
    p.add_argument("--interval", type=float, help="seconds between cycles (default: monitor_interval_s)")
    p.add_argument("--once", action="store_true", help="run one cycle and print what it did")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("health", help="node health checks (Slurm's HealthCheckProgram)")
    hsub = p.add_subparsers(dest="health_command", required=True)
    c = hsub.add_parser("check", help="check this node; drain it when a check fails, resume it after passes")
    c.add_argument("--node", help="the Slurm node to check (default: $SLURMD_NODENAME, else the host name)")
    c.add_argument("--dry-run", action="store_true", help="check and report only: never drain, resume or count passes")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--all", action="store_true", help="report every failure (default: up to the first one)")
    c.add_argument("--timeout", type=float, help="watchdog for the whole run in seconds (default: health_timeout_s)")
    c.set_defaults(func=cmd_health_check)

    p = sub.add_parser("dev", help="dev cluster tools (root; refused unless health_dev_faults is set)")
    dsub = p.add_subparsers(dest="dev_command", required=True)
    c = dsub.add_parser("fail-node", help="inject a fault into one emulated node, or --heal it")
    c.add_argument("node")
    c.add_argument("--mode", choices=["gpu", "disk", "slurmd", "hang"],
                   help="gpu: move its fake GPU device aside; disk: its scratch reads as full; slurmd: kill "
                        "its slurmd and its jobs' processes (node death); hang: its shared-filesystem probe blocks")
    c.add_argument("--heal", action="store_true", help="undo the fault (all of the node's faults without --mode)")
    c.set_defaults(func=cmd_fail_node)

    p = sub.add_parser("user", help="portal accounts (root, on the portal host)")
    usub = p.add_subparsers(dest="user_command", required=True)
    c = usub.add_parser("add", help="add a user mapped to a Unix account (no password: API tokens only)")
    c.add_argument("name")
    c.add_argument("--unix-user", required=True, help="the Unix account the user's jobs run as (never root)")
    c.add_argument("--admin", action=argparse.BooleanOptionalAction, default=None,
                   help="an admin (sees every job, drains nodes); --no-admin takes it away with --exists-ok")
    _add_password(c, required=False)
    c.add_argument("--email", help="where health and recovery notifications go (default: UNIXUSER@notify_email_domain; "
                                   "'' removes it)")
    c.add_argument("--exists-ok", action="store_true",
                   help="an existing user is not an error: its admin flag and password are set as given")
    _add_config(c)
    c.set_defaults(func=cmd_user_add)
    c = usub.add_parser("list", help="users, their Unix accounts and tokens")
    c.add_argument("--json", action="store_true")
    _add_config(c)
    c.set_defaults(func=cmd_user_list)
    c = usub.add_parser("passwd", help="set a user's password (from a file or stdin)")
    c.add_argument("name")
    _add_password(c, required=True)
    _add_config(c)
    c.set_defaults(func=cmd_user_passwd)
    for verb, disable, text in (("disable", True, "stop a user's logins and tokens"),
                                ("enable", False, "let a disabled user in again")):
        c = usub.add_parser(verb, help=text)
        c.add_argument("name")
        _add_config(c)
        c.set_defaults(func=cmd_user_disable, disable=disable)

    p = sub.add_parser("service", help="inference services: replicas behind POST|PUT /service/NAME")
    ssub = p.add_subparsers(dest="service_command", required=True)
    c = ssub.add_parser("deploy", help="deploy a model as a service")
    c.add_argument("name", help="lower-case letters, digits and '-': the URL /service/NAME")
    _add_spec_arguments(c, required=True)
    _add_policy_arguments(c)
    c.add_argument("--wait", action="store_true", help="wait until the replicas are ready")
    c.add_argument("--wait-timeout", type=float, default=600.0, metavar="SECONDS")
    c.add_argument("--json", action="store_true", help="print the API's JSON")
    c.set_defaults(func=cmd_service_deploy)
    c = ssub.add_parser("list", help="your services")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_service_list)
    c = ssub.add_parser("show", help="a service and its replicas")
    c.add_argument("name")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_service_show)
    c = ssub.add_parser("scale", help="set the replica count, or the autoscaling range")
    c.add_argument("name")
    _add_policy_arguments(c)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_service_scale)
    c = ssub.add_parser("update", help="a new version: rolling update (one replica at a time), or a gray release "
                                       "with --weight")
    c.add_argument("name")
    _add_spec_arguments(c, required=False)
    c.add_argument("--weight", type=int, metavar="PERCENT",
                   help="gray release: with new fields (1-99), the new version runs beside the current one for this "
                        "share of the requests; alone, changes the share (100: roll it out, 0: stop it)")
    c.add_argument("--wait", action="store_true", help="wait until the rolling update is over")
    c.add_argument("--wait-timeout", type=float, default=600.0, metavar="SECONDS")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_service_update)
    c = ssub.add_parser("delete", help="delete a service (its replicas are stopped)")
    c.add_argument("name")
    c.set_defaults(func=cmd_service_delete)

    p = sub.add_parser("token", help="API tokens: your own (through the API), or any user's with --user (root)")
    tsub = p.add_subparsers(dest="token_command", required=True)
    c = tsub.add_parser("create", help="a new API token, printed once (and nothing else on stdout)")
    c.add_argument("--user", help="for this user, straight on the database (root, on the portal host)")
    c.add_argument("--name", help="a label to tell tokens apart")
    c.add_argument("--expires-days", type=int, metavar="D", help="valid for D days (default: until revoked)")
    _add_config(c)
    c.set_defaults(func=cmd_token_create)
    c = tsub.add_parser("list", help="tokens (never the tokens themselves)")
    c.add_argument("--user", help="this user's, straight on the database (root, on the portal host)")
    c.add_argument("--json", action="store_true")
    _add_config(c)
    c.set_defaults(func=cmd_token_list)
    c = tsub.add_parser("revoke", help="revoke a token by its id (see `token list`)")
    c.add_argument("id", type=int)
    c.add_argument("--user", help="a token of this user, straight on the database (root, on the portal host)")
    _add_config(c)
    c.set_defaults(func=cmd_token_revoke)

    p = sub.add_parser("project", help="projects (root, on the portal host)")
    psub = p.add_subparsers(dest="project_command", required=True)
    c = psub.add_parser("add", help="add a project, with members")
    c.add_argument("name")
    c.add_argument("--slurm-account", help="Slurm account its jobs are charged to (--account)")
    c.add_argument("--description")
    c.add_argument("--member", action="append", default=[], metavar="USER", help="a member (repeatable)")
    c.add_argument("--exists-ok", action="store_true", help="an existing project is not an error (members are added)")
    _add_config(c)
    c.set_defaults(func=cmd_project_add)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:
        print("aiportal: %s" % e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

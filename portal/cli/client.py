"""The CLI's side of the portal's API: errors, the token, every HTTP call (``_api``), the log
stream (Server-Sent Events) and small output helpers."""
from __future__ import annotations

import codecs
import datetime as dt
import email.utils
import http.client
import json
import functools
import os
import ssl
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path


DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_SITE = "/etc/aiportal/site.toml"
DEFAULT_TOKEN_FILE = Path.home() / ".config" / "aiportal" / "token"
#: how to get a token, said with every 401
TOKEN_HELP = ("get a token on the portal's Tokens page, or have an admin run `aiportal token create --user NAME` "
              "on the portal host; then pass --token-file FILE or set AIPORTAL_TOKEN")


class CliError(Exception):
    """A failure the user can act on: printed as ``aiportal: MESSAGE``, exit status 2."""


class PortalUnreachable(CliError):
    """No HTTP answer at all (connection refused or dropped, timeout)."""


class ApiError(CliError):
    """The portal answered with an error: its status, code, message and invalid fields (and
    its ``Retry-After``, in seconds, when it sent one)."""

    def __init__(self, status: int, code: str, message: str, errors: dict[str, str] | None = None,
                 retry_after: float | None = None):
        self.status, self.code, self.detail, self.errors = status, code, message, dict(errors or {})
        self.retry_after = retry_after
        lines = [message]
        # a validation message usually says "field: why" for each field already; add the rest
        lines += ["  %s: %s" % (f, m) for f, m in self.errors.items() if "%s: %s" % (f, m) not in message]
        super().__init__("\n".join(lines))

    @property
    def transient(self) -> bool:
        """Worth trying again: the portal is overloaded or cannot reach Slurm or the log host."""
        return self.status in (429, 502, 503, 504)


# -- where the portal is, and whom to trust for its certificate ----------------------------------

def site_defaults(environ=None) -> tuple[str, str]:
    """The portal's URL and the CA file for its certificate: --url/--ca are given on the command
    line, else $AIPORTAL_URL/$AIPORTAL_CA, else the site's public settings (site.toml:
    portal_url, and portal_ca_file where the site names one), else http://127.0.0.1:8000 and
    the system's CAs."""
    environ = os.environ if environ is None else environ
    site = Path(environ.get("AIPORTAL_SITE_CONFIG") or DEFAULT_SITE)
    try:
        with site.open("rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        values = {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CliError("cannot read the site settings %s (%s); fix it, or pass --url and --ca" % (site, e)) from e
    url = environ.get("AIPORTAL_URL") or str(values.get("portal_url") or DEFAULT_URL)
    ca = environ.get("AIPORTAL_CA") or str(values.get("portal_ca_file") or "")
    return url, ca


@functools.lru_cache(maxsize=4)
def _tls_context(ca_file: str) -> ssl.SSLContext:
    """Certificates checked against ``ca_file``, or the system's CAs when it is empty (the dev CA
    is among them after provisioning)."""
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as e:
        raise CliError("cannot use %s as the CA file for the portal's certificate (%s); pass --ca FILE "
                       "(a PEM bundle) or set AIPORTAL_CA" % (ca_file, getattr(e, "strerror", None) or e)) from e


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: the token would go along to wherever ``Location`` points (the
    answer is an HTTPError that :func:`_error_from` turns into "pass --url ...")."""

    def redirect_request(self, *args, **kwargs):
        return None


_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def urlopen(args, req: urllib.request.Request, timeout: float):
    """``urllib.request.urlopen`` for the portal: HTTPS checked against ``args.ca`` (or the
    system's CAs), no redirect followed, and plain HTTP only to this host (the token would cross
    the network in clear; ``AIPORTAL_INSECURE_HTTP=1`` allows it). A certificate the CAs do not
    vouch for is a CliError that says what to pass."""
    url = urllib.parse.urlsplit(req.full_url)
    if url.scheme == "http" and (url.hostname or "") not in _LOOPBACK and not (url.hostname or "").startswith("127.") \
            and os.environ.get("AIPORTAL_INSECURE_HTTP") != "1":
        raise CliError("refusing to send the API token over plain HTTP to %s: use the portal's https:// address "
                       "(portal_url in /etc/aiportal/site.toml), or set AIPORTAL_INSECURE_HTTP=1 on a network you "
                       "trust" % url.netloc)
    handlers: list = [_NoRedirect]
    if url.scheme == "https":
        handlers.append(urllib.request.HTTPSHandler(context=_tls_context(getattr(args, "ca", "") or "")))
    try:
        return urllib.request.build_opener(*handlers).open(req, timeout=timeout)
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLCertVerificationError):
            raise CliError("the portal at %s has a certificate that %s does not vouch for (%s); pass the site's CA "
                           "with --ca FILE or set AIPORTAL_CA (an admin finds it in site.toml: portal_ca_file, or "
                           "/usr/local/share/ca-certificates)" % (args.url, getattr(args, "ca", "") or "the system's CAs",
                                                                   e.reason.verify_message or e.reason)) from None
        raise


def denied_message(ev) -> str:
    """What a ``denied`` event (the stream's token or session no longer valid) tells the user."""
    try:
        said = str(json.loads(ev.data).get("message") or "")
    except (ValueError, AttributeError):
        said = ""
    return "the portal ended the log stream: %s\n%s" % (said or "the token is no longer valid", TOKEN_HELP)


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
    if e.code in (301, 302, 303, 307, 308) and e.headers and e.headers.get("Location"):
        # the plain-HTTP port of a portal served over HTTPS (redirects are not followed: urlopen)
        moved = e.headers["Location"].split("/api/")[0]
        message = ("the portal at %s sends its clients to %s: pass --url %s (or set AIPORTAL_URL; without "
                   "either, portal_url in site.toml is used)" % (url.split("/api/")[0], moved, moved))
    if e.code == 401:
        message = "the portal at %s refused the API token from %s: %s\n%s" % (
            url.split("/api/")[0], token_source, message, TOKEN_HELP)
    return ApiError(e.code, code, message, errors if isinstance(errors, dict) else None,
                    _retry_after(e.headers.get("Retry-After") if e.headers else None))


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: a number of seconds, or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())


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
        resp = urlopen(args, req, timeout=args.timeout)
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


#: a create request is sent again, with the same Idempotency-Key, after these answers (a proxy or
#: the portal overloaded, Slurm unreachable), after no answer at all, and while the portal says the
#: first request with the key is still being processed
RETRY_STATUSES = (502, 503, 504)
#: the longest wait between two tries, whatever Retry-After says
RETRY_MAX_WAIT_S = 30.0
#: how long "still being processed" (409 idempotency_in_flight) is waited out; longer than the
#: portal's idempotency_in_flight_s (30 s), after which it answers with what the request stored
IN_FLIGHT_WAIT_S = 120.0


def create(args, path: str, body: dict, what: str) -> dict:
    """``POST /api/v1{path}`` for something that must be made once (a job, a service): sent with
    an ``Idempotency-Key`` (``--idempotency-key``, else a fresh uuid4) and sent again with the same
    key, up to ``--retries`` times, when there was no answer (refused, reset, timed out) or a
    502/503/504, waiting what ``Retry-After`` says or 1, 2, 4, ... s. While the portal says the
    first request with the key is still being processed (409 ``idempotency_in_flight``: e.g. a
    portal killed mid-request, until its in-flight time has passed), it is asked again as
    ``Retry-After`` says for up to :data:`IN_FLIGHT_WAIT_S`, without using up retries. The portal
    answers a repeated key with its first answer, so a retry never makes a second one. Each retry
    is said on stderr; giving up says how to ask again with the same key."""
    key = getattr(args, "idempotency_key", None) or str(uuid.uuid4())
    tries = 1 + max(0, getattr(args, "retries", 4))
    attempt, backoff, started = 1, 1.0, time.monotonic()
    while True:
        try:
            return _api(args, "POST", path, body, headers={"Idempotency-Key": key})
        except ApiError as e:
            in_flight = e.code == "idempotency_in_flight"
            if e.status not in RETRY_STATUSES and not in_flight:
                raise
            last, wait = e, e.retry_after
            reason = "answered %d %s: %s" % (e.status, e.code, (e.detail.splitlines() or [""])[0])
        except PortalUnreachable as e:
            last, wait, in_flight = e, None, False
            reason = str(e).splitlines()[0]
        if in_flight and time.monotonic() - started < IN_FLIGHT_WAIT_S:
            wait = min(RETRY_MAX_WAIT_S, 1.0 if wait is None else wait)
            print("aiportal: POST %s: the portal is still processing the first request with Idempotency-Key %s; "
                  "asking again in %.1f s" % (path, key, wait), file=sys.stderr)
            time.sleep(wait)
            continue
        if attempt == tries:
            raise CliError("POST %s: %s\ngave up after %d tries; nothing was made twice: to get this request's answer "
                           "(or make the %s if the portal never stored it), run the same command again with "
                           "--idempotency-key %s" % (path, reason, tries, what, key)) from last
        attempt += 1
        wait = min(RETRY_MAX_WAIT_S, backoff if wait is None else wait)
        backoff = min(RETRY_MAX_WAIT_S, backoff * 2)
        print("aiportal: POST %s: %s; trying again in %.1f s with the same Idempotency-Key %s (try %d of %d)"
              % (path, reason, wait, key, attempt, tries), file=sys.stderr)
        time.sleep(wait)


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
    query = {"follow": "1", "offset": str(offset)}
    if task is not None:
        query["task"] = task
    path = "/jobs/%s/log?%s" % (urllib.parse.quote(job_id, safe=""), urllib.parse.urlencode(query))
    return follow_stream(args, path, "job %s" % job_id, "aiportal logs -f %s --offset {at}" % job_id, offset, out,
                         give_up_s, backoff_max_s)


def print_log(args, path: str, query: dict[str, str], what: str, offset: int = 0, out=None) -> int:
    """Write what a log (a job's, a replica's: ``path`` + ``?offset=N&query``) has so far to
    ``out``, reading on from each answer's ``X-Log-Offset`` until an empty one (UTF-8 decoded
    across reads); returns the offset reached."""
    out = out or sys.stdout
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while True:
        resp = _api(args, "GET", "%s?%s" % (path, urllib.parse.urlencode({"offset": str(offset), **query})),
                    stream=True, headers={"Accept": "text/plain"})
        try:
            with resp:
                data = resp.read()
                nxt = resp.headers.get("X-Log-Offset")
        except (TimeoutError, OSError, http.client.HTTPException) as e:
            raise PortalUnreachable("the portal at %s dropped the log of %s at byte %d (%s)"
                                    % (args.url, what, offset, e)) from e
        out.write(decoder.decode(data))
        if not data:
            break
        offset = int(nxt) if nxt and nxt.isdigit() else offset + len(data)
    out.write(decoder.decode(b"", final=True))
    out.flush()
    return offset


def follow_stream(args, path: str, what: str, resume: str, offset: int = 0, out=None,
                  give_up_s: float | None = None, backoff_max_s: float = 10.0) -> int:
    """Follow one log's Server-Sent Events at ``path`` (a job's, a replica's) as
    :func:`follow_log` says; ``what`` names the log in messages, ``resume`` is the command that
    picks it up again (``{at}``: the byte offset reached)."""
    out = out or sys.stdout
    give_up_s = args.reconnect_for if give_up_s is None else give_up_s
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
                        raise PortalUnreachable("the portal closed the log stream before %s ended" % what)
                    failing_since, delay = None, None
                    for ev in parser.feed(chunk):
                        if ev.event == "log":
                            out.write(_log_text(ev))
                            out.flush()
                        elif ev.event == "end":
                            return int(parser.last_id) if (parser.last_id or "").isdigit() else offset
                        elif ev.event == "denied":
                            raise CliError(denied_message(ev))
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
            raise CliError("lost the log stream of %s at byte %s and could not get it back for %.0f s "
                           "(last error: %s); resume with `%s`"
                           % (what, at, give_up_s, str(reason).splitlines()[0], resume.format(at=at)))
        if delay is None:
            delay = (parser.retry_ms or 1000) / 1000.0
        else:
            delay = min(backoff_max_s, delay * 2)
        delay = min(delay, max(0.05, give_up_s - (now - failing_since)))
        print("aiportal: log stream of %s interrupted at byte %s (%s); reconnecting in %.1f s"
              % (what, at, str(reason).splitlines()[0], delay), file=sys.stderr)
        time.sleep(delay)


# -- arguments shared by commands ---------------------------------------------------------------

def _parse_env(items: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError("--env %r: write it as NAME=VALUE" % item)
        out.append((key, value))
    return tuple(out)


def _add_create_arguments(p) -> None:
    """The arguments of commands that make something through :func:`create`."""
    p.add_argument("--idempotency-key", metavar="KEY",
                   help="send this Idempotency-Key (default: a fresh uuid4); the same key again within 24 h gets "
                        "the first answer, never a second job or service")
    p.add_argument("--retries", type=int, default=4, metavar="N",
                   help="send the request again, with the same key, up to N times when the portal does not answer "
                        "or answers 502/503/504 (default 4)")


def _command_of(args, verb: str) -> list[str]:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise CliError("give the command after --, e.g. aiportal %s ... -- python3 train.py" % verb)
    return list(command)

"""The `aiportal` CLI over the JSON API (against a live portal on the dev cluster), the admin
commands on a database of their own, and the log follower's SSE parser and reconnects."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlmodel import Session

from portal import db as dbmod
from portal.cli import ApiError, CliError, SseEvent, SseParser, follow_log, main
from portal.services import accounts
from tests.conftest import REPO
from tests.portal.conftest import write_test_config

AIPORTAL = str(REPO / ".venv" / "bin" / "aiportal")
live = [pytest.mark.portal, pytest.mark.slurm]


@dataclass
class Result:
    code: int
    out: str
    err: str


def call(*argv: str, stdin: str | None = None) -> Result:
    """``main(argv)`` in this process, with stdout and stderr captured (and stdin if given)."""
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    finally:
        sys.stdin = old_stdin
    return Result(code, out.getvalue(), err.getvalue())


# -- against the live portal ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def token_files(live_portal, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-tokens")
    out = {}
    for name, token in live_portal.tokens.items():
        out[name] = d / name
        out[name].write_text(token + "\n")
    return out


def as_user(live_portal, token_files, name: str):
    def run(*argv: str) -> Result:
        return call("--url", live_portal.url, "--token-file", str(token_files[name]), *argv)
    return run


PRINTS = "import time\nfor i in range(3):\n    print('cli line %d' % i, flush=True)\n    time.sleep(0.5)\n"


@pytest.fixture(scope="module")
def followed(live_portal, token_files, base_image):
    """A job submitted as alice with --follow, run to its end."""
    return as_user(live_portal, token_files, "alice")(
        "submit", "--image", str(base_image), "--node-type", "1card", "--time", "5", "--name", "cli-follow",
        "--env", "GREETING=hi", "--follow", "--", "python3", "-c", PRINTS)


def _job_id(res: Result) -> str:
    line = next(l for l in res.err.splitlines() if l.startswith("aiportal: submitted job "))
    return line.split()[3]


@pytest.mark.portal
@pytest.mark.slurm
def test_submit_follow_prints_the_log_and_exits_with_the_jobs_code(followed):
    assert followed.code == 0, followed.err
    assert "\ncli line 0\ncli line 1\ncli line 2\n" in followed.out, followed.out
    assert followed.out.endswith("command exited with 0\n")
    # a clean job's log: no warnings or notices from the container runtime or the script
    noise = [line for line in followed.out.splitlines() if line.startswith(("WARNING", "INFO:", "ERROR", "FATAL"))]
    assert not noise, followed.out
    assert "ended: COMPLETED, exit code 0" in followed.err


@pytest.mark.portal
@pytest.mark.slurm
def test_jobs_show_and_logs_of_the_finished_job(live_portal, token_files, followed):
    alice = as_user(live_portal, token_files, "alice")
    job_id = _job_id(followed)
    listing = alice("jobs", "--json")
    assert listing.code == 0, listing.err
    mine = {j["id"]: j for j in json.loads(listing.out)["jobs"]}
    assert mine[job_id]["state"] == "COMPLETED" and mine[job_id]["name"] == "cli-follow"
    table = alice("jobs", "--state", "completed")
    assert job_id[:8] in table.out and "cli-follow" in table.out
    one = alice("jobs", "--limit", "1", "--json")
    assert len(json.loads(one.out)["jobs"]) == 1
    total = json.loads(alice("jobs", "--all-pages", "--json").out)
    assert len(total["jobs"]) == total["total"] >= 1
    if total["total"] > 1:
        assert "(1 of %d jobs; --limit N or --all-pages for more)" % total["total"] in alice("jobs", "--limit", "1").err
    bad_state = alice("jobs", "--state", "sleeping")
    assert bad_state.code == 2 and bad_state.err == "aiportal: state: unknown state 'SLEEPING'\n"

    shown = alice("show", job_id)
    assert shown.code == 0, shown.err
    timeline = shown.out.split("timeline:")[1]
    assert "submitted" in timeline and "RUNNING" in timeline and "finished" in timeline
    assert "python3 -c" in shown.out and "COMPLETED" in shown.out
    by_prefix = alice("show", job_id[:8], "--json")
    assert json.loads(by_prefix.out)["id"] == job_id
    script = alice("show", job_id, "--script")
    assert script.out.startswith("#!/bin/bash") and "export GREETING=hi" in script.out

    log = alice("logs", job_id)
    assert log.code == 0, log.err
    assert "cli line 0\ncli line 1\ncli line 2\n" in log.out
    tail = alice("logs", job_id, "--offset", str(log.out.encode().index(b"cli line 2\n")))
    assert tail.out.startswith("cli line 2\n") and "cli line 1" not in tail.out
    again = alice("logs", "-f", job_id)           # a finished job: the whole log, then the end
    assert again.code == 0 and "cli line 2\n" in again.out


@pytest.mark.portal
@pytest.mark.slurm
def test_another_users_job_is_not_found(live_portal, token_files, followed):
    bob = as_user(live_portal, token_files, "bob")
    job_id = _job_id(followed)
    for argv in (("show", job_id), ("logs", job_id), ("cancel", job_id)):
        res = bob(*argv)
        assert res.code == 2
        assert res.err == "aiportal: job %s: not found, or not yours (`aiportal jobs`)\n" % job_id
    assert job_id not in bob("jobs", "--json", "--all-pages").out


@pytest.mark.portal
@pytest.mark.slurm
def test_cancel_a_running_job(live_portal, token_files, base_image):
    alice = as_user(live_portal, token_files, "alice")
    sub = alice("submit", "--image", str(base_image), "--node-type", "1card", "--time", "5", "--name", "cli-sleep",
                "--", "sleep", "300")
    assert sub.code == 0, sub.err
    job_id = sub.out.strip()
    assert len(job_id) == 36
    deadline = time.monotonic() + 60
    while json.loads(alice("show", job_id, "--json").out)["state"] != "RUNNING":
        assert time.monotonic() < deadline, "job %s did not start in 60 s" % job_id
        time.sleep(0.5)
    res = alice("cancel", job_id, "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["id"] == job_id
    deadline = time.monotonic() + 60
    state = None
    while time.monotonic() < deadline:
        state = json.loads(alice("show", job_id, "--json").out)["state"]
        if state == "CANCELLED":
            break
        time.sleep(0.5)
    assert state == "CANCELLED"
    again = alice("cancel", job_id)
    assert again.code == 2 and "has already ended (CANCELLED)" in again.err


@pytest.mark.portal
@pytest.mark.slurm
def test_bad_node_type_names_the_field(live_portal, token_files, base_image):
    res = as_user(live_portal, token_files, "alice")(
        "submit", "--image", str(base_image), "--node-type", "8card", "--", "true")
    assert res.code == 2
    assert res.err.startswith("aiportal: node_type: ") and "8card" in res.err
    empty = as_user(live_portal, token_files, "alice")("submit", "--image", "", "--node-type", "", "--", "true")
    assert empty.code == 2
    assert "image: choose an image" in empty.err and "node_type: choose a node type" in empty.err
    missing = as_user(live_portal, token_files, "alice")(
        "submit", "--image", str(base_image), "--node-type", "1card", "--sweep", "LR", "--", "true")
    assert missing.code == 2 and "--sweep 'LR': write it as NAME=V1,V2" in missing.err


@pytest.mark.portal
def test_wrong_token_says_how_to_get_one(live_portal, tmp_path):
    bad = tmp_path / "token"
    bad.write_text("aip_wrong")
    res = call("--url", live_portal.url, "--token-file", str(bad), "jobs")
    assert res.code == 2
    assert res.err.startswith("aiportal: the portal at %s refused the API token from %s: " % (live_portal.url, bad))
    assert "aiportal token create --user NAME" in res.err and "Tokens page" in res.err


@pytest.mark.portal
def test_token_create_through_the_api_prints_only_the_token(live_portal, token_files, tmp_path):
    res = as_user(live_portal, token_files, "bob")("token", "create", "--name", "cli-test")
    assert res.code == 0, res.err
    token = res.out.strip()
    assert res.out == token + "\n" and token.startswith("aip_")
    assert "not shown again" in res.err and token not in res.err
    (tmp_path / "new").write_text(token)
    listed = call("--url", live_portal.url, "--token-file", str(tmp_path / "new"), "token", "list", "--json")
    assert listed.code == 0, listed.err
    rec = next(t for t in json.loads(listed.out) if t["name"] == "cli-test")
    assert token.startswith(rec["prefix"]) and token not in listed.out
    revoked = call("--url", live_portal.url, "--token-file", str(tmp_path / "new"), "token", "revoke", str(rec["id"]))
    assert revoked.code == 0, revoked.err
    after = call("--url", live_portal.url, "--token-file", str(tmp_path / "new"), "jobs")
    assert after.code == 2 and "refused the API token" in after.err


def test_unreachable_portal_names_the_url_and_make_run(tmp_path):
    (tmp_path / "t").write_text("x")
    res = call("--url", "http://127.0.0.1:9199", "--token-file", str(tmp_path / "t"), "jobs")
    assert res.code == 2
    assert "cannot reach the portal at http://127.0.0.1:9199" in res.err and "`make run`" in res.err


# -- admin commands on a portal database of their own ---------------------------------------------

@pytest.fixture
def portal_toml(tmp_path):
    """A portal.toml with fresh secrets and its own SQLite file, migrated by `aiportal db upgrade`."""
    config = write_test_config(tmp_path)
    res = call("db", "upgrade", "--config", str(config))
    assert res.code == 0, res.err
    return config


def _user_for(config, token: str):
    from portal.settings import Settings
    engine = dbmod.make_engine(Settings.load(config).database_url)
    try:
        with Session(engine) as db:
            user = accounts.user_for_token(db, token)
            return user.name if user else None
    finally:
        engine.dispose()


PASSWORD = "carol-password-0042"


def test_user_add_is_idempotent_with_exists_ok(portal_toml):
    cfg = ("--config", str(portal_toml))
    first = call("user", "add", "carol", "--unix-user", "bob", "--password-stdin", *cfg, stdin=PASSWORD + "\n")
    assert first.code == 0, first.err
    assert first.out == "added user carol (Unix user bob)\n"
    same = call("user", "add", "carol", "--unix-user", "bob", "--password-stdin", "--exists-ok", *cfg,
                stdin=PASSWORD + "\n")
    assert same.code == 0 and same.out == "user carol exists: unchanged\n"
    admin = call("user", "add", "carol", "--unix-user", "bob", "--admin", "--exists-ok", *cfg)
    assert admin.out == "user carol exists: admin\n"
    dup = call("user", "add", "carol", "--unix-user", "bob", *cfg)
    assert dup.code == 2 and "user 'carol' already exists (add --exists-ok" in dup.err
    moved = call("user", "add", "carol", "--unix-user", "alice", "--exists-ok", *cfg)
    assert moved.code == 2 and "mapped to Unix user 'bob', not 'alice'" in moved.err
    listed = json.loads(call("user", "list", "--json", *cfg).out)
    assert listed == [{"name": "carol", "unix_user": "bob", "is_admin": True, "disabled": False,
                       "has_password": True, "tokens": 0, "created_at": listed[0]["created_at"]}]
    for res in (first, same, admin, dup, moved):
        assert PASSWORD not in res.out + res.err


def test_user_add_without_password_and_password_from_file(portal_toml, tmp_path):
    cfg = ("--config", str(portal_toml))
    res = call("user", "add", "dave", "--unix-user", "alice", *cfg)
    assert res.code == 0 and "API tokens only, no password" in res.out
    pw = tmp_path / "pw"
    pw.write_text("short\n")
    weak = call("user", "passwd", "dave", "--password-file", str(pw), *cfg)
    assert weak.code == 2 and "password: use at least 10 characters" in weak.err
    pw.write_text(PASSWORD + "\n")
    ok = call("user", "passwd", "dave", "--password-file", str(pw), *cfg)
    assert ok.code == 0 and PASSWORD not in ok.out + ok.err
    assert json.loads(call("user", "list", "--json", *cfg).out)[0]["has_password"] is True
    table = call("user", "list", *cfg).out.splitlines()
    assert table[0].split()[:3] == ["NAME", "UNIX", "USER"] and table[1].split()[:3] == ["dave", "alice", "yes"]
    nobody = call("user", "passwd", "nobody", "--password-file", str(pw), *cfg)
    assert nobody.code == 2 and "user 'nobody' does not exist" in nobody.err


@pytest.mark.parametrize("unix_user, message", [
    ("no-such-unix-user", "unix_user: Unix user 'no-such-unix-user' does not exist on this host"),
    ("root", "unix_user: jobs never run as root"),
    ("Bad User", "is not a Unix user name"),
])
def test_user_add_refuses_bad_unix_users(portal_toml, unix_user, message):
    res = call("user", "add", "erin", "--unix-user", unix_user, "--config", str(portal_toml))
    assert res.code == 2
    assert res.err.startswith("aiportal: ") and message in res.err
    assert json.loads(call("user", "list", "--json", "--config", str(portal_toml)).out) == []


def test_token_create_for_a_user_prints_only_the_token(portal_toml):
    cfg = ("--config", str(portal_toml))
    assert call("user", "add", "frank", "--unix-user", "alice", *cfg).code == 0
    # as a subprocess, the way `TOKEN=$(aiportal token create --user frank)` runs it
    res = subprocess.run([AIPORTAL, "token", "create", "--user", "frank", "--name", "ci", "--expires-days", "7", *cfg],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    token = res.stdout.strip()
    assert res.stdout == token + "\n" and token.startswith("aip_")
    assert "not shown again" in res.stderr and token not in res.stderr
    assert _user_for(portal_toml, token) == "frank"
    listed = json.loads(call("token", "list", "--user", "frank", "--json", *cfg).out)
    assert [(t["name"], t["revoked"]) for t in listed] == [("ci", False)] and listed[0]["expires_at"]
    assert token not in json.dumps(listed)
    assert call("token", "revoke", str(listed[0]["id"]), "--user", "frank", *cfg).code == 0
    assert _user_for(portal_toml, token) is None
    wrong = call("token", "revoke", str(listed[0]["id"]), "--user", "nobody", *cfg)
    assert wrong.code == 2 and "user 'nobody' does not exist" in wrong.err


def test_disabled_users_tokens_stop_working(portal_toml):
    cfg = ("--config", str(portal_toml))
    assert call("user", "add", "gina", "--unix-user", "bob", *cfg).code == 0
    token = call("token", "create", "--user", "gina", *cfg).out.strip()
    assert _user_for(portal_toml, token) == "gina"
    assert call("user", "disable", "gina", *cfg).code == 0
    assert _user_for(portal_toml, token) is None
    refused = call("token", "create", "--user", "gina", *cfg)
    assert refused.code == 2 and "gina is disabled" in refused.err and refused.out == ""
    assert call("user", "enable", "gina", *cfg).code == 0
    assert _user_for(portal_toml, token) == "gina"


def test_project_add_with_members(portal_toml):
    cfg = ("--config", str(portal_toml))
    assert call("user", "add", "hank", "--unix-user", "alice", *cfg).code == 0
    res = call("project", "add", "vision", "--slurm-account", "vis", "--member", "hank", *cfg)
    assert res.code == 0, res.err
    assert res.out == "added project vision (Slurm account vis; members added: hank)\n"
    dup = call("project", "add", "vision", *cfg)
    assert dup.code == 2 and "already exists" in dup.err
    assert call("project", "add", "vision", "--exists-ok", "--member", "hank", *cfg).code == 0
    unknown = call("project", "add", "nlp", "--member", "nobody", *cfg)
    assert unknown.code == 2 and "user 'nobody' does not exist" in unknown.err


def test_admin_commands_need_a_readable_config(tmp_path):
    res = call("user", "list", "--config", str(tmp_path / "missing.toml"))
    assert res.code == 2 and "does not exist" in res.err and "run as root on the portal host" in res.err


def test_admin_commands_refuse_an_unmigrated_database(tmp_path, portal_toml):
    other = tmp_path / "other.toml"
    other.write_text(portal_toml.read_text().replace("portal.db", "empty.db"))
    res = call("user", "list", "--config", str(other))
    assert res.code == 2 and "run `aiportal db upgrade`" in res.err


# -- the SSE parser -------------------------------------------------------------------------------

STREAM = (b"retry: 2000\n\n"
          b": heartbeat\n\n"
          b'id: 12\nevent: log\ndata: {"text": "h\xc3\xa9llo\\n", "offset": 12}\n\n'
          b"data: first\r\ndata:second\r\n\r\n"
          b"event: ping\rdata\r\r"
          b"id: 30\n: comment between fields\nevent: log\ndata: a\ndata: b\n\n"
          b"event: end\ndata: {\"state\": \"ended\"}\n\n")
EXPECTED = [
    SseEvent("log", '{"text": "h\u00e9llo\\n", "offset": 12}', "12"),
    SseEvent("message", "first\nsecond", "12"),
    SseEvent("ping", "", "12"),
    SseEvent("log", "a\nb", "30"),
    SseEvent("end", '{"state": "ended"}', "30"),
]


@pytest.mark.parametrize("size", [len(STREAM), 1, 2, 3, 7, 64])
def test_sse_parser_on_a_stream_split_anywhere(size):
    parser = SseParser()
    events = []
    for i in range(0, len(STREAM), size):
        events += parser.feed(STREAM[i:i + size])
    assert events == EXPECTED
    assert parser.retry_ms == 2000 and parser.last_id == "30"


def test_sse_parser_waits_for_the_blank_line_and_a_cr_split_from_its_lf():
    parser = SseParser()
    assert parser.feed(b"id: 7\nevent: log\ndata: x\r") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r") == []
    assert parser.feed(b"\n") == [SseEvent("log", "x", "7")]
    assert parser.feed(b"\n\n") == []            # blank lines without data dispatch nothing
    assert parser.feed(b"data: y\n\n") == [SseEvent("message", "y", "7")]   # the id persists


def test_sse_parser_ignores_bad_ids_and_unknown_fields():
    parser = SseParser()
    assert parser.feed(b"id: 5\n\nid: a\0b\nretry: soon\nfoo: bar\ndata: z\n\n") == [SseEvent("message", "z", "5")]
    assert parser.retry_ms is None


# -- follow: reconnects against a small real HTTP server ------------------------------------------

def _log(text: str, offset: int) -> bytes:
    return b"id: %d\nevent: log\ndata: %s\n\n" % (offset, json.dumps({"text": text, "offset": offset}).encode())


class _Script:
    """What the server answers, one entry per request: (status, body bytes, then drop?)."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests: list[dict] = []


@pytest.fixture
def sse_server():
    state = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):
            script = state["script"]
            script.requests.append({"path": self.path, "last_event_id": self.headers.get("Last-Event-ID"),
                                    "auth": self.headers.get("Authorization")})
            status, body = script.answers.pop(0) if script.answers else (503, b'{"error": "x", "message": "down"}')
            self.send_response(status)
            self.send_header("Content-Type", "text/event-stream" if status == 200 else "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = None
    for port in range(9160, 9200):      # DESIGN.md: tests' own servers use 9100-9199
        try:
            server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
            break
        except OSError:
            continue
    assert server is not None, "no free port in 127.0.0.1:9160-9199"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def use(answers):
        state["script"] = _Script(answers)
        return state["script"]
    try:
        yield "http://127.0.0.1:%d" % server.server_address[1], use
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _args(url, tmp_path, reconnect_for=5.0):
    (tmp_path / "tok").write_text("tok-123\n")
    return argparse.Namespace(url=url, token_file=str(tmp_path / "tok"), timeout=5.0,
                              reconnect_for=reconnect_for)


def test_follow_resumes_with_last_event_id_after_a_dropped_connection(sse_server, tmp_path, capsys):
    url, use = sse_server
    script = use([
        (200, b"retry: 50\n\n" + _log("one\n", 4) + _log("two\n", 8) + b"id: 12\nevent: log\ndata: {\"te"),  # cut
        (503, b'{"error": "log_unavailable", "message": "cannot read log"}'),
        (200, _log("three\n", 14) + b": heartbeat\n\n" + b'event: end\ndata: {"state": "ended"}\n\n'),
    ])
    out = io.StringIO()
    assert follow_log(_args(url, tmp_path), "job-1", 0, out=out) == 14
    assert out.getvalue() == "one\ntwo\nthree\n"
    assert [r["last_event_id"] for r in script.requests] == [None, "8", "8"]
    assert script.requests[0]["path"] == "/api/v1/jobs/job-1/log?follow=1&offset=0"
    assert script.requests[0]["auth"] == "Bearer tok-123"
    err = capsys.readouterr().err
    assert "log stream of job job-1 interrupted at byte 8" in err and "cannot read log" in err


def test_follow_gives_up_with_a_message_that_says_how_to_resume(sse_server, tmp_path):
    url, use = sse_server
    use([(200, b"retry: 20\n\n" + _log("one\n", 4))])           # then the server only says 503
    out = io.StringIO()
    t0 = time.monotonic()
    with pytest.raises(CliError) as err:
        follow_log(_args(url, tmp_path, reconnect_for=1.0), "job-2", 0, out=out, backoff_max_s=0.2)
    assert time.monotonic() - t0 < 5
    assert out.getvalue() == "one\n"
    assert "could not get it back for 1 s" in str(err.value)
    assert "resume with `aiportal logs -f job-2 --offset 4`" in str(err.value)


def test_follow_does_not_retry_a_job_that_is_not_found(sse_server, tmp_path):
    url, use = sse_server
    script = use([(404, b'{"error": "not_found", "message": "job job-3 does not exist"}')])
    with pytest.raises(ApiError) as err:
        follow_log(_args(url, tmp_path), "job-3", 0, out=io.StringIO())
    assert err.value.status == 404 and str(err.value) == "job job-3 does not exist"
    assert len(script.requests) == 1


@pytest.mark.parametrize("content", ["", "two\nlines", "has space"])
def test_a_malformed_token_is_refused_without_echoing_it(tmp_path, content):
    (tmp_path / "tok").write_text(content)
    res = call("--url", "http://127.0.0.1:9199", "--token-file", str(tmp_path / "tok"), "jobs")
    assert res.code == 2
    assert res.err == ("aiportal: the API token from %s is empty or more than one word; it should be the one line "
                       "that `aiportal token create` printed\n" % (tmp_path / "tok"))


@pytest.mark.portal
def test_service_commands(live_portal, token_files, base_image, tmp_path):
    """The service commands over the API (no replica needs to start: the service is deleted
    at once, before the controller's next cycle could matter)."""
    alice = as_user(live_portal, token_files, "alice")
    bad = alice("service", "deploy", "cli-bad", "--image", "/nope.sif", "--model", "/srv/aiportal/shared/users/alice")
    assert bad.code == 2 and bad.err.startswith("aiportal: image: /nope.sif: not found, or not readable by your "
                                                "account (Unix user alice)")
    bad = alice("service", "deploy", "Bad_Name", "--image", str(base_image), "--model", "/x")
    assert bad.code == 2 and "name: 1-48 lower-case letters" in bad.err
    name = "cli-%s" % os.urandom(3).hex()
    ok = alice("service", "deploy", name, "--image", str(base_image), "--model", "/srv/aiportal/shared/users/alice",
               "--min", "0", "--max", "2")
    try:
        assert ok.code == 0 and "/service/%s" % name in ok.out, ok.err
        listed = alice("service", "list")
        assert listed.code == 0 and name in listed.out and "0-2" in listed.out
        shown = alice("service", "show", name)
        assert shown.code == 0 and "0 wanted (min 0, max 2" in shown.out
        scaled = alice("service", "scale", name, "--max", "3", "--json")
        assert scaled.code == 0 and json.loads(scaled.out)["max_replicas"] == 3
        assert as_user(live_portal, token_files, "bob")("service", "show", name).code == 2
    finally:
        gone = alice("service", "delete", name)
    assert gone.code == 0 and "deleting" in gone.out
    deadline = time.monotonic() + 20      # the controller removes it (and its folder) within a cycle
    while alice("service", "show", name).code == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alice("service", "show", name).code == 2


def test_user_add_sets_the_notification_email(portal_toml):
    from sqlmodel import select

    from portal.models import User
    from portal.settings import Settings
    cfg = ("--config", str(portal_toml))
    assert call("user", "add", "erin", "--unix-user", "bob", "--email", "erin@example.org", *cfg).code == 0
    changed = call("user", "add", "erin", "--unix-user", "bob", "--email", "e2@example.org", "--exists-ok", *cfg)
    assert changed.out == "user erin exists: email e2@example.org\n"
    bad = call("user", "add", "frank", "--unix-user", "bob", "--email", "not an address", *cfg)
    assert bad.code == 2 and "not an email address" in bad.err
    engine = dbmod.make_engine(Settings.load(portal_toml).database_url)
    try:
        with Session(engine) as db:
            assert db.exec(select(User).where(User.name == "erin")).one().email == "e2@example.org"
    finally:
        engine.dispose()


def test_follow_stops_with_the_portals_word_when_the_stream_is_denied(sse_server, tmp_path):
    """A stream whose token was revoked ends with a ``denied`` event: the CLI says so and does not
    reconnect (a reconnect would only be refused)."""
    url, use = sse_server
    script = use([(200, _log("one\n", 4) + b'event: denied\ndata: {"message": "the token is revoked"}\n\n')])
    out = io.StringIO()
    with pytest.raises(CliError) as err:
        follow_log(_args(url, tmp_path), "job-4", 0, out=out)
    assert out.getvalue() == "one\n"
    assert "the portal ended the log stream: the token is revoked" in str(err.value)
    assert "aiportal token create" in str(err.value) and len(script.requests) == 1


@pytest.mark.portal
def test_sessions_lists_the_browsers_and_revoke_logs_out_everywhere(live_portal, token_files):
    """Log in twice in "browsers" (cookie jars), see both in `aiportal sessions`, end them with
    `aiportal sessions --revoke`: both cookies stop working, the CLI's token does not."""
    import http.cookiejar
    import re
    import urllib.parse
    import urllib.request
    from tests.portal.conftest import PASSWORDS
    jars = []
    for _ in range(2):
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        with opener.open(live_portal.url + "/login", timeout=20) as resp:
            csrf = re.search(r'name="csrf" value="([^"]+)"', resp.read().decode()).group(1)
        data = urllib.parse.urlencode({"name": "bob", "password": PASSWORDS["bob"], "csrf": csrf}).encode()
        with opener.open(live_portal.url + "/login", data=data, timeout=20) as resp:
            assert "Log out" in resp.read().decode()
        jars.append(opener)
    bob = as_user(live_portal, token_files, "bob")
    listed = bob("sessions", "--json")
    assert listed.code == 0, listed.err
    assert len(json.loads(listed.out)) >= 2
    table = bob("sessions")
    assert table.code == 0 and table.out.startswith("ID") and "127.0.0.1" in table.out, table
    ended = bob("sessions", "--revoke")
    assert ended.code == 0 and ended.out.startswith("logged out everywhere: "), ended
    assert int(ended.out.split(": ")[1].split()[0]) >= 2
    for opener in jars:
        with opener.open(live_portal.url + "/jobs", timeout=20) as resp:
            assert "/login" in resp.geturl()
    assert bob("sessions").out == "no browser is logged in to this account\n"

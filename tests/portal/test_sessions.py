"""Web sessions kept on the server, and the rate limit of wrong API tokens, through the Flask
test client: a cookie saved before logging out no longer works; "log out everywhere" (page and
API); idle and absolute timeouts at their exact boundaries; a password change ends the other
sessions; the database holds only a hash of the session's id. Wrong bearer tokens: 429 with
Retry-After after N per client address, other addresses unaffected."""
from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import replace

import pytest
from sqlmodel import Session, select

from portal.app import create_app
from portal.errors import ConfigError
from portal.models import LoginFailure, User, WebSession
from portal.settings import Settings
from tests.portal.conftest import PASSWORDS, bearer, csrf_of, login

HOUR, DAY = 3600, 86400


def logged_in(app, name="alice", agent="test-browser/1.0"):
    client = app.test_client()
    client.environ_base["HTTP_USER_AGENT"] = agent
    assert login(client, name).status_code == 302
    return client


def cookie_of(client) -> str:
    return client.get_cookie("session").value


def with_cookie(app, value: str):
    client = app.test_client()
    client.set_cookie("session", value)
    return client


def rows(engine) -> list[WebSession]:
    with Session(engine) as db:
        return list(db.exec(select(WebSession).order_by(WebSession.id)))


def is_in(client) -> bool:
    """Whether the client's cookie is a live session (the API answers, the pages too)."""
    me = client.get("/api/v1/me")
    page = client.get("/jobs")
    assert (me.status_code == 200) == (page.status_code == 200)
    return me.status_code == 200


# -- logging out ends the session --------------------------------------------------------------

def test_a_cookie_saved_before_logout_no_longer_works(app, engine, users):
    client = logged_in(app)
    saved = cookie_of(client)
    assert is_in(with_cookie(app, saved))
    assert client.post("/logout", data={"csrf": csrf_of(client, "/jobs")}).status_code == 302
    replay = with_cookie(app, saved)
    assert replay.get("/api/v1/me").status_code == 401
    r = replay.get("/jobs")
    assert r.status_code == 302 and r.headers["Location"].startswith("/login")
    assert rows(engine) == []


def test_a_signed_cookie_naming_the_user_is_not_a_session(app, users):
    """The cookie of before (user id and password mark, signed) no longer logs anyone in."""
    serializer = app.session_interface.get_signing_serializer(app)
    forged = serializer.dumps({"uid": users["alice"].id, "pw": users["alice"].password_hash[-12:], "csrf": "x"})
    assert not is_in(with_cookie(app, forged))


def test_only_a_hash_of_the_session_id_is_stored(app, engine, users):
    client = logged_in(app, agent="Mozilla/5.0 " + "x" * 300)
    sid = app.session_interface.get_signing_serializer(app).loads(cookie_of(client))["sid"]
    assert len(sid) >= 40
    [rec] = rows(engine)
    assert rec.id_sha256 == hashlib.sha256(sid.encode()).hexdigest()
    assert rec.user_id == users["alice"].id and rec.address == "127.0.0.1"
    assert rec.user_agent.startswith("Mozilla/5.0 x") and len(rec.user_agent) == 128
    assert sid not in repr(rec.model_dump())
    # a new login is a new id (no session fixation)
    again = app.session_interface.get_signing_serializer(app).loads(cookie_of(logged_in(app)))["sid"]
    assert again != sid


def test_logout_of_one_browser_leaves_the_others(app, engine, users):
    one, two = logged_in(app), logged_in(app)
    one.post("/logout", data={"csrf": csrf_of(one, "/jobs")})
    assert not is_in(one) and is_in(two)
    assert len(rows(engine)) == 1


# -- log out everywhere ------------------------------------------------------------------------

def test_log_out_everywhere_from_the_page(app, engine, users):
    one, two, bobs = logged_in(app), logged_in(app), logged_in(app, "bob")
    saved = cookie_of(one)
    page = one.get("/tokens").get_data(as_text=True)
    assert 'id="logout-everywhere"' in page and "this one" in page and "test-browser/1.0" in page
    assert one.post("/account/sessions/revoke", data={"csrf": "wrong"}).status_code == 400
    assert is_in(two)
    r = one.post("/account/sessions/revoke", data={"csrf": csrf_of(one, "/jobs")})
    assert r.status_code == 302 and r.headers["Location"] == "/login"
    assert "logged out everywhere" in one.get("/login").get_data(as_text=True)
    assert not is_in(one) and not is_in(two) and not is_in(with_cookie(app, saved))
    assert is_in(bobs)
    assert [r.user_id for r in rows(engine)] == [users["bob"].id]


def test_log_out_everywhere_through_the_api(app, engine, users, tokens):
    one, two, bobs = logged_in(app), logged_in(app, agent="other/2"), logged_in(app, "bob")
    listed = one.get("/api/v1/sessions").get_json()["sessions"]
    assert len(listed) == 2 and {s["user_agent"] for s in listed} == {"test-browser/1.0", "other/2"}
    assert [s["current"] for s in listed if s["user_agent"] == "test-browser/1.0"] == [True]
    assert set(listed[0]) == {"id", "created_at", "last_seen_at", "address", "user_agent", "current"}
    # as a token: not a session, so none is current
    by_token = one.get("/api/v1/sessions", headers=bearer(tokens["alice"])).get_json()["sessions"]
    assert [s["current"] for s in by_token] == [False, False]
    # the browser's own call needs the CSRF header, like every write
    assert one.post("/api/v1/sessions/revoke").status_code == 400
    r = one.post("/api/v1/sessions/revoke", headers=bearer(tokens["alice"]))
    assert r.status_code == 200 and r.get_json() == {"ended": 2}
    assert not is_in(one) and not is_in(two) and is_in(bobs)
    assert one.get("/api/v1/me", headers=bearer(tokens["alice"])).status_code == 200    # tokens stay
    assert one.post("/api/v1/sessions/revoke", headers=bearer(tokens["alice"])).get_json() == {"ended": 0}


# -- timeouts (defaults: idle 8 hours, absolute 7 days) -----------------------------------------

def age(engine, **seconds) -> None:
    """Move every session's times into the past: ``created_at=S``, ``last_seen_at=S``."""
    with Session(engine) as db:
        for rec in db.exec(select(WebSession)):
            for column, s in seconds.items():
                setattr(rec, column, getattr(rec, column) - dt.timedelta(seconds=s))
            db.add(rec)
        db.commit()


@pytest.mark.parametrize("column, seconds, alive", [
    ("last_seen_at", 8 * HOUR - 5, True), ("last_seen_at", 8 * HOUR, False),
    ("created_at", 7 * DAY - 5, True), ("created_at", 7 * DAY, False)])
def test_sessions_time_out_idle_and_absolute(app, engine, users, column, seconds, alive):
    client = logged_in(app)
    age(engine, **{column: seconds})
    assert is_in(client) == alive
    assert len(rows(engine)) == (1 if alive else 0)       # a timed-out session is removed


def test_a_busy_session_still_ends_at_its_absolute_timeout(app, engine, users):
    client = logged_in(app)
    age(engine, created_at=7 * DAY - 120)
    assert is_in(client)                                   # seen just now
    age(engine, created_at=120)
    assert not is_in(client)


def test_timeouts_are_settings(settings, engine, users):
    app = create_app({"TESTING": True}, settings=replace(settings, session_idle_s=600, session_max_age_s=3600),
                     engine=engine)
    client = logged_in(app)
    age(engine, last_seen_at=599)
    assert is_in(client)                                   # and seen now
    age(engine, last_seen_at=600)
    assert not is_in(client)
    with pytest.raises(ConfigError, match="session_idle_s"):
        Settings.from_mapping({"session_idle_s": 0}, require_secrets=False)
    loaded = Settings.from_mapping({"session_idle_s": "60", "session_max_age_s": "120"}, require_secrets=False)
    assert (loaded.session_idle_s, loaded.session_max_age_s) == (60.0, 120.0)
    assert (Settings().session_idle_s, Settings().session_max_age_s) == (8 * HOUR, 7 * DAY)


def test_last_seen_is_written_at_most_once_a_minute(app, engine, users):
    client = logged_in(app)
    age(engine, last_seen_at=30)
    before = rows(engine)[0].last_seen_at
    for _ in range(3):
        assert is_in(client)
    assert rows(engine)[0].last_seen_at == before          # no write per request
    age(engine, last_seen_at=31)                           # now 61 s ago
    assert is_in(client)
    after = rows(engine)[0].last_seen_at
    assert (dt.datetime.now(dt.timezone.utc) - after).total_seconds() < 5


# -- a password change ends the other sessions ---------------------------------------------------

def test_changing_the_password_on_the_page_keeps_this_session_and_ends_the_others(app, engine, users):
    this, other, bobs = logged_in(app), logged_in(app), logged_in(app, "bob")
    csrf = csrf_of(this, "/tokens")
    form = {"csrf": csrf, "current_password": PASSWORDS["alice"], "new_password": "a-new-password-1",
            "new_password2": "a-new-password-1"}
    for wrong, field in (({"current_password": "nope"}, "current_password"),
                         ({"new_password": "short", "new_password2": "short"}, "new_password"),
                         ({"new_password2": "something-else"}, "new_password2")):
        r = this.post("/account/password", data={**form, **wrong})
        assert r.status_code == 422 and 'id="err-%s"' % field in r.get_data(as_text=True), field
    assert is_in(other)                                     # nothing changed
    r = this.post("/account/password", data=form)
    assert r.status_code == 302 and r.headers["Location"] == "/tokens"
    assert is_in(this) and not is_in(other) and is_in(bobs)
    fresh = app.test_client()
    assert login(fresh, "alice").status_code == 401
    assert login(fresh, "alice", "a-new-password-1").status_code == 302


def test_an_admin_changing_a_password_ends_every_session_of_the_account(app, engine, users):
    from portal.services import accounts
    one, two = logged_in(app), logged_in(app)
    with Session(engine) as db:
        accounts.set_password(db, db.get(User, users["alice"].id), "a-new-password-1")
        db.commit()
    assert not is_in(one) and not is_in(two) and rows(engine) == []


def test_a_disabled_account_has_no_session(app, engine, users):
    client = logged_in(app)
    with Session(engine) as db:
        db.get(User, users["alice"].id).disabled = True
        db.commit()
    assert not is_in(client)


def test_csrf_still_guards_the_session(app, users, fake_backend):
    client = logged_in(app)
    token = csrf_of(client, "/jobs")
    assert client.post("/tokens", data={"csrf": "wrong", "name": "x"}).status_code == 400
    assert client.post("/tokens", data={"csrf": token, "name": "x"}).status_code == 200
    # the CSRF token of a session does not work for another one
    other = logged_in(app)
    assert other.post("/tokens", data={"csrf": token, "name": "x"}).status_code == 400


# -- wrong bearer tokens are rate-limited per client address (default: 20 in 5 minutes) -------

def call(client, token, address):
    return client.get("/api/v1/me", headers=bearer(token), environ_base={"REMOTE_ADDR": address})


def test_wrong_tokens_get_429_after_the_limit_per_address(client, tokens):
    for n in range(20):
        r = call(client, "aip_wrong-%d" % n, "10.0.0.1")
        assert r.status_code == 401, n
    r = call(client, "aip_wrong-again", "10.0.0.1")
    assert r.status_code == 429 and r.headers["Retry-After"] == "300"
    body = r.get_json()
    assert body["error"] == "rate_limited" and "10.0.0.1" in body["message"] and set(body) == {"error", "message"}
    # a right token from that address still works (every local account shares 127.0.0.1 behind
    # nginx: 20 wrong tokens must not lock everyone out), and so it does from another address
    assert call(client, tokens["alice"], "10.0.0.1").status_code == 200
    assert call(client, "aip_wrong-more", "10.0.0.1").status_code == 429
    assert call(client, tokens["alice"], "10.0.0.2").status_code == 200
    assert call(client, "aip_wrong", "10.0.0.2").status_code == 401
    # no token, or another scheme, is not a wrong token: still 401 from the limited address
    assert client.get("/api/v1/me", environ_base={"REMOTE_ADDR": "10.0.0.1"}).status_code == 401


def test_the_limit_lifts_when_the_window_has_passed(client, engine, tokens):
    for n in range(20):
        call(client, "aip_wrong-%d" % n, "10.0.0.1")
    assert call(client, "aip_wrong-x", "10.0.0.1").status_code == 429
    with Session(engine) as db:
        for rec in db.exec(select(LoginFailure)):
            rec.at -= dt.timedelta(seconds=301)
            db.add(rec)
        db.commit()
    assert call(client, tokens["alice"], "10.0.0.1").status_code == 200
    with Session(engine) as db:
        assert db.exec(select(LoginFailure)).all() != []
    assert call(client, "aip_wrong", "10.0.0.1").status_code == 401    # and old failures are removed
    with Session(engine) as db:
        assert len(db.exec(select(LoginFailure)).all()) == 1


def test_token_failures_and_login_failures_are_counted_apart(client, tokens):
    for n in range(20):
        call(client, "aip_wrong-%d" % n, "127.0.0.1")
    assert call(client, "aip_wrong-more", "127.0.0.1").status_code == 429
    assert login(client, "alice").status_code == 302                # the login form is not blocked


def test_the_token_limit_is_a_setting(settings, engine, users, tokens):
    app = create_app({"TESTING": True}, settings=replace(settings, token_failures_per_address=3,
                                                         token_failure_window_s=60), engine=engine)
    client = app.test_client()
    for n in range(3):
        assert call(client, "aip_wrong-%d" % n, "10.0.0.9").status_code == 401
    r = call(client, "aip_wrong-more", "10.0.0.9")
    assert r.status_code == 429 and r.headers["Retry-After"] == "60"
    assert call(client, tokens["alice"], "10.0.0.9").status_code == 200      # a right token passes
    with pytest.raises(ConfigError, match="token_failures_per_address"):
        Settings.from_mapping({"token_failures_per_address": 0}, require_secrets=False)


def test_the_api_document_lists_429_for_every_operation_behind_a_token():
    from portal.api.openapi import openapi_document
    for path, ops in openapi_document()["paths"].items():
        for method, entry in ops.items():
            if entry.get("security") != []:
                assert "429" in entry["responses"], (method, path)

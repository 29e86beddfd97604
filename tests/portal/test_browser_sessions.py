"""Logging out ends the session, through a portal of its own (gunicorn, real HTTP): the session
cookie saved before ``POST /logout`` no longer works after it. Once with plain HTTP (urllib and
a cookie jar), once in a real headless Chromium (the cookie taken from the browser, replayed
with urllib after the browser clicked "Log out")."""
from __future__ import annotations

import http.cookiejar
import re
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.portal.conftest import PASSWORDS, start_test_portal
from tests.portal.test_browser import browser, wait_for  # noqa: F401 (fixture)

pytestmark = [pytest.mark.portal]


@pytest.fixture(scope="module")
def portal(tmp_path_factory):
    portal = start_test_portal(tmp_path_factory.mktemp("session-portal"), users=(("alice", "alice", False),),
                               passwords=PASSWORDS)
    try:
        yield portal
    finally:
        portal.stop()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def me_with_cookie(url: str, cookie: str) -> int:
    """The status of ``GET /api/v1/me`` sent with only this session cookie."""
    req = urllib.request.Request(url + "/api/v1/me", headers={"Cookie": "session=" + cookie})
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        with e:
            return e.code


def page_with_cookie(url: str, cookie: str) -> tuple[int, str]:
    """(status, Location) of ``GET /jobs`` with only this cookie, redirects not followed."""
    opener = urllib.request.build_opener(NoRedirect)
    req = urllib.request.Request(url + "/jobs", headers={"Cookie": "session=" + cookie})
    try:
        with opener.open(req, timeout=20) as resp:
            return resp.status, ""
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers.get("Location", "")


def test_a_saved_cookie_no_longer_works_after_logout_over_http(portal):
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), NoRedirect)

    def csrf(path: str) -> str:
        with opener.open(portal.url + path, timeout=20) as resp:
            return re.search(r'name="csrf" value="([^"]+)"', resp.read().decode()).group(1)

    def post(path: str, form: dict) -> int:
        try:
            with opener.open(portal.url + path, data=urllib.parse.urlencode(form).encode(), timeout=20) as resp:
                return resp.status
        except urllib.error.HTTPError as e:
            with e:
                return e.code

    assert post("/login", {"name": "alice", "password": PASSWORDS["alice"], "csrf": csrf("/login")}) == 302
    [saved] = [c.value for c in jar if c.name == "session"]
    assert me_with_cookie(portal.url, saved) == 200
    assert post("/logout", {"csrf": csrf("/jobs")}) == 302
    assert me_with_cookie(portal.url, saved) == 401
    status, where = page_with_cookie(portal.url, saved)
    assert status == 302 and "/login" in where


def test_a_saved_cookie_no_longer_works_after_logout_in_the_browser(portal, browser):
    from selenium.webdriver.common.by import By
    d, url = browser, portal.url
    d.get(url + "/login")
    d.find_element(By.ID, "name").send_keys("alice")
    d.find_element(By.ID, "password").send_keys(PASSWORDS["alice"])
    d.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    wait_for("logged in", lambda: "/login" not in d.current_url, 20)
    saved = d.get_cookie("session")["value"]
    assert me_with_cookie(url, saved) == 200
    d.find_element(By.ID, "logout").click()
    wait_for("the login form after logging out", lambda: "/login" in d.current_url, 20)
    assert me_with_cookie(url, saved) == 401
    status, where = page_with_cookie(url, saved)
    assert status == 302 and "/login" in where
    # the browser itself is logged out too
    d.get(url + "/tokens")
    assert "/login" in d.current_url

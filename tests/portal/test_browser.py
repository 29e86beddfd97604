"""A real headless Chromium, driven by Selenium, against the live portal (gunicorn + reconciler)
on the dev cluster: log in, fill the new-job form, watch the live log and the plot, log out.

Needs the Debian package ``chromium-driver`` (``/usr/bin/chromedriver``; ``chromium`` comes
with it) and the PyPI package ``selenium``. Selenium never downloads a driver or a browser
here: both paths are given."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.portal, pytest.mark.slurm]

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
# 41 progress lines with falling loss, a quarter of a second apart (about 10 s of "training")
TRAIN = ("python3 -c \"import time; [(print('step %d, loss = %.4f (%.1f examples/sec; 0.250 sec/batch)' "
         "% (n, 2.5 * 0.93 ** n, 480 + 3 * n), flush=True), time.sleep(0.25)) for n in range(41)]\"")


@pytest.fixture
def browser():
    for path, package in ((CHROMEDRIVER, "chromium-driver"), (CHROMIUM, "chromium")):
        if not os.access(path, os.X_OK):
            pytest.skip("%s is missing: install the Debian package %s to run the browser tests" % (path, package))
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, check, timeout: float, interval: float = 0.25, describe=None):
    """Poll ``check`` until it returns something true; else fail saying what the page showed."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("waited %.0f s for %s%s" % (timeout, what, "; " + describe() if describe else ""))
        time.sleep(interval)


def screenshot_dir(tmp_path: Path) -> Path:
    out = Path(os.environ["AIPORTAL_ARTIFACTS"]) if os.environ.get("AIPORTAL_ARTIFACTS") else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_train_from_the_browser_with_live_log_and_plot(live_portal, base_image, browser, tmp_path):
    from selenium.webdriver.common.by import By

    from .conftest import PASSWORDS

    d, url = browser, live_portal.url

    def log_text() -> str:
        return d.find_element(By.ID, "log").get_attribute("textContent") or ""

    # logged out: every page sends the browser to the login form
    d.get(url + "/jobs/new")
    assert "/login" in d.current_url
    d.find_element(By.ID, "name").send_keys("alice")
    d.find_element(By.ID, "password").send_keys(PASSWORDS["alice"])
    d.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    wait_for("the new-job form after login", lambda: d.current_url.endswith("/jobs/new"), 20)

    # the form, as a person fills it in
    d.find_element(By.ID, "name").send_keys("browser-test")
    d.find_element(By.ID, "image").clear()         # the form starts on the site's first base image
    d.find_element(By.ID, "image").send_keys(str(base_image))
    d.find_element(By.ID, "node_type-1card").click()
    d.find_element(By.ID, "command").send_keys(TRAIN)
    time_limit = d.find_element(By.ID, "time_limit")
    time_limit.clear()
    time_limit.send_keys("00:05:00")
    d.find_element(By.ID, "show-script").click()
    script = wait_for("the rendered script", lambda: d.find_elements(By.ID, "script"), 20)[0].text
    assert "#SBATCH --partition=gpu-1card" in script
    assert d.find_element(By.ID, "name").get_attribute("value") == "browser-test"     # input kept
    d.find_element(By.ID, "submit").click()
    wait_for("the job page", lambda: re.search(r"/jobs/[0-9a-f-]{36}$", d.current_url), 60)
    job_url = d.current_url
    assert "job submitted as Slurm job" in d.page_source

    def shown() -> str:
        return "state %r, log status %r, log tail %r" % (
            d.find_element(By.CSS_SELECTOR, "#job-state .state").text, d.find_element(By.ID, "log-status").text,
            log_text()[-300:])

    # the live log grows while the job runs (Server-Sent Events appended to the <pre>)
    wait_for("step 10 in the live log", lambda: "step 10, loss" in log_text(), 180, describe=shown)
    wait_for("step 40 in the live log", lambda: "step 40, loss" in log_text(), 120, describe=shown)
    wait_for("the log stream to say the job ended (the reconciler records the end)",
             lambda: d.find_element(By.ID, "log-status").text == "job ended", 60, describe=shown)

    # the reconciler records the end: reload until the page says COMPLETED
    def completed() -> bool:
        d.get(job_url)
        return d.find_element(By.CSS_SELECTOR, "#job-state .state").text == "COMPLETED"
    wait_for("state COMPLETED", completed, 120, interval=1.0, describe=shown)
    timeline = d.find_element(By.ID, "timeline").text
    assert "submitted as Slurm job" in timeline and "exit code 0" in timeline

    # the plot: drawn on the server from the log's progress lines, fetched by the page's script
    wait_for("the plot's lines", lambda: len(d.find_elements(By.CSS_SELECTOR, "#plot svg polyline, #plot svg path"))
             >= 2, 30, describe=lambda: d.find_element(By.ID, "plot").get_attribute("innerHTML")[:2000])
    assert "step 40" in d.find_element(By.ID, "plot").get_attribute("innerHTML")
    wait_for("the log after reload", lambda: "step 40, loss" in log_text(), 60)

    shot = screenshot_dir(tmp_path) / "job-page.png"
    d.execute_script("window.scrollTo(0, 0)")
    d.set_window_size(1280, max(2000, d.execute_script("return document.body.scrollHeight")))
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    print("screenshot of the job page: %s" % shot)

    # no script errors on the way (a missing favicon is not one)
    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]
    assert severe == []

    # log out: the session is gone
    d.find_element(By.ID, "logout").click()
    wait_for("the login form after logging out", lambda: "/login" in d.current_url, 20)
    d.get(url + "/jobs")
    assert "/login" in d.current_url

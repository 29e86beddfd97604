"""The job page's "Finish stage-out" in a real headless Chromium against the live test portal on
the dev cluster: a job whose stage-out is pending shows what is pending, the help text and the
button; a click (a form with the page's CSRF token) starts the finishing job, the page shows its
log and reloads itself once the reconciler has seen it end; then nothing is pending and the
timeline says so. Screenshots go to $AIPORTAL_ARTIFACTS (or the test's folder)."""
from __future__ import annotations

import pytest

from tests.portal.conftest import PASSWORDS
from tests.portal.test_browser import browser, screenshot_dir, wait_for  # noqa: F401 (fixture)
from tests.portal.test_stage_out_live import pending_jobs  # noqa: F401 (fixture)

pytestmark = [pytest.mark.portal, pytest.mark.slurm]


def test_finish_stage_out_from_the_job_page(live_portal, pending_jobs, browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    d, url, shots = browser, live_portal.url, screenshot_dir(tmp_path)
    job = pending_jobs()
    job.unblock()
    d.get(url + "/login")
    d.find_element(By.ID, "name").send_keys("alice")
    d.find_element(By.ID, "password").send_keys(PASSWORDS["alice"])
    d.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    wait_for("logged in", lambda: "/login" not in d.current_url, 20)

    d.get(url + "/jobs/" + job.id)
    assert "A stage-out could not finish" in d.find_element(By.ID, "stage-out-pending").text
    records = d.find_element(By.ID, "stage-out-records").text
    assert str(job.dest) in records and "Permission denied" in records
    help_text = d.find_element(By.ID, "stage-out-help").text
    assert "runs aiportal stage out as the job's Unix user" in help_text and "aiportal stage finish" in help_text
    d.save_screenshot(str(shots / "stage-out-pending.png"))

    d.find_element(By.ID, "finish-stage-out").click()
    wait_for("the finish to start", lambda: "finishing the stage-out in Slurm job" in d.page_source, 20)
    d.save_screenshot(str(shots / "stage-out-finishing.png"))
    # the page reloads itself once the reconciler has seen the finishing job end
    wait_for("the stage-out to be finished", lambda: not d.find_elements(By.ID, "stage-out-pending"), 180,
             describe=lambda: d.find_element(By.TAG_NAME, "main").text[-1500:])
    timeline = d.find_element(By.ID, "timeline").text
    assert "finish stage-out requested by alice: Slurm job" in timeline
    assert "stage-out finished: the outputs are at %s; the credentials file was removed" % job.dest in timeline
    assert (job.dest / "model.bin").read_bytes() == (job.dir / "output" / "model.bin").read_bytes()
    d.save_screenshot(str(shots / "stage-out-finished.png"))

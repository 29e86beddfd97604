"""The Images page and the job form's image field in a real headless Chromium, against a portal
of its own and a throwaway registry: add a registry account (a wrong password is refused beside
the field, nothing stored), see it listed, and have the job form check an image as it is typed.
Screenshots go to $AIPORTAL_ARTIFACTS (or the test's folder)."""
from __future__ import annotations

import pytest

from tests.portal.conftest import PASSWORDS as LOGIN, start_test_portal
from tests.portal.test_browser import browser, screenshot_dir, wait_for  # noqa: F401 (fixture)
from tests.registries import PASSWORDS, registry  # noqa: F401 (fixture)

pytestmark = [pytest.mark.portal]


@pytest.fixture(scope="module")
def img_portal(tmp_path_factory, registry):
    portal = start_test_portal(tmp_path_factory.mktemp("img-portal"), users=(("alice", "alice", False),),
                               passwords=LOGIN, config_lines=('registry_insecure = ["%s"]' % registry.host,))
    try:
        yield portal
    finally:
        portal.stop()


def test_registry_account_and_image_check_in_the_browser(img_portal, registry, browser, tmp_path):
    from selenium.webdriver.common.by import By
    d, url, shots = browser, img_portal.url, screenshot_dir(tmp_path)
    d.get(url + "/login")
    d.find_element(By.ID, "name").send_keys("alice")
    d.find_element(By.ID, "password").send_keys(LOGIN["alice"])
    d.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    wait_for("logged in", lambda: "/login" not in d.current_url, 20)

    d.get(url + "/images")
    assert "Registry accounts" in d.page_source

    def add(password: str) -> None:
        form = d.find_element(By.ID, "registry-form")
        for field, value in (("registry", registry.host), ("username", "alice"), ("password", password)):
            el = form.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        form.find_element(By.CSS_SELECTOR, "button.primary").click()

    add("wrong-password")
    err = wait_for("the password's error", lambda: d.find_elements(By.CSS_SELECTOR, "#registry-form .error, "
                                                                    "#registry-form .field-error"), 20)
    assert "refused user 'alice'" in " ".join(e.text for e in err)
    assert d.find_element(By.ID, "registry").get_attribute("value") == registry.host      # input kept
    assert not d.find_elements(By.ID, "registries")
    d.save_screenshot(str(shots / "images-wrong-password.png"))
    add(PASSWORDS["alice"])
    table = wait_for("the account listed", lambda: d.find_elements(By.ID, "registries"), 20)[0]
    assert registry.host in table.text and "alice" in table.text
    assert PASSWORDS["alice"] not in d.page_source
    d.save_screenshot(str(shots / "images-registry-added.png"))

    d.get(url + "/jobs/new")
    field = d.find_element(By.ID, "image")
    field.clear()
    field.send_keys("docker://%s/site/base:1" % registry.host)
    ok = wait_for("the check", lambda: "\u2713" in d.find_element(By.ID, "image-check").text, 20,
                  describe=lambda: d.find_element(By.ID, "image-check").text)
    assert ok
    assert "@sha256:" in d.find_element(By.ID, "image-check").text
    d.save_screenshot(str(shots / "job-form-image-ok.png"))
    field.clear()
    field.send_keys("docker://%s/site/base:nope" % registry.host)
    wait_for("the refusal", lambda: "\u2717" in d.find_element(By.ID, "image-check").text, 20,
             describe=lambda: d.find_element(By.ID, "image-check").text)
    assert "does not exist" in d.find_element(By.ID, "image-check").text
    d.save_screenshot(str(shots / "job-form-image-missing.png"))

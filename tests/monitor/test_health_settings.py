"""The health and notification settings: typed from TOML and the environment, secrets kept
out of the world-readable site.toml, thresholds validated with the fix in the message."""
import pytest

from portal.errors import ConfigError
from portal.settings import Settings


def test_types_from_the_environment():
    s = Settings.load(path="/nonexistent", site_path="/nonexistent", require_secrets=False, environ={
        "AIPORTAL_HEALTH_SKIP_CHECKS": "munge,apptainer", "AIPORTAL_HEALTH_DEV_FAULTS": "true",
        "AIPORTAL_HEALTH_RESUME_AFTER_PASSES": "5", "AIPORTAL_NOTIFY_BACKOFF_S": "2.5"})
    c = s.health_config()
    assert c.skip_checks == ("munge", "apptainer") and c.dev_faults is True and c.resume_after_passes == 5
    assert s.notify_backoff_s == 2.5


@pytest.mark.parametrize("key,value,message", [
    ("AIPORTAL_HEALTH_DEV_FAULTS", "maybe", "health_dev_faults = 'maybe' is not a valid bool"),
    ("AIPORTAL_HEALTH_TIMEOUT_S", "soon", "health_timeout_s = 'soon' is not a valid float"),
])
def test_bad_values_are_named(key, value, message):
    with pytest.raises(ConfigError, match=message):
        Settings.load(path="/nonexistent", site_path="/nonexistent", require_secrets=False, environ={key: value})


@pytest.mark.parametrize("values,message", [
    ({"health_timeout_s": 60}, "Slurm kills HealthCheckProgram after 60 s"),
    ({"health_probe_timeout_s": 30, "health_timeout_s": 20}, "must be above 0 and below health_timeout_s"),
    ({"health_resume_after_passes": 0}, "at least 1"),
])
def test_thresholds_are_checked(values, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_mapping(values, require_secrets=False).health_config()


def test_secrets_are_refused_in_site_toml(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text('notify_webhook_secret = "x"\nnotify_smtp_password = "y"\n')
    with pytest.raises(ConfigError, match="notify_smtp_password, notify_webhook_secret: site.toml is readable"):
        Settings.load(path="/nonexistent", site_path=site, require_secrets=False, environ={})

"""The health and notification settings: the health check's settings are one nested object
(``Settings.health``, a HealthConfig) from the [health] table of site.toml and AIPORTAL_HEALTH_*
variables, the shared settings typed once, secrets kept out of the world-readable site.toml,
thresholds validated with the setting and the fix in the message."""
from dataclasses import fields, replace

import pytest

from monitor.config import HealthConfig
from portal.errors import ConfigError
from portal.settings import HEALTH_SHARED, Settings


def load(tmp_path, site_text=None, portal_text=None, **env):
    site = tmp_path / "site.toml"
    if site_text is not None:
        site.write_text(site_text)
    portal = tmp_path / "portal.toml"
    if portal_text is not None:
        portal.write_text(portal_text)
    return Settings.load(path=portal, site_path=site, require_secrets=False, environ=env)


SITE = '''
cluster_name = "c"
slurm_conf = "/etc/slurm-x/slurm.conf"
shared_root = "/shared"

[health]
state_dir = "/var/lib/h"
timeout_s = 15
probe_timeout_s = 4.5
resume_after_passes = 2
skip_checks = ["munge"]
gpu_fatal_xids = [79]
dev_faults = true

[node_types]
1card = { partition = "p1", gpus = 1, gpu_type = "a100", cpus = 4, memory_mb = 1000 }
'''


def test_the_health_table_of_site_toml_with_the_shared_settings_typed_once(tmp_path):
    s = load(tmp_path, SITE)
    assert s.health == HealthConfig(slurm_conf="/etc/slurm-x/slurm.conf", shared_root="/shared", state_dir="/var/lib/h",
                                    timeout_s=15.0, probe_timeout_s=4.5, resume_after_passes=2, skip_checks=("munge",),
                                    gpu_fatal_xids=(79,), dev_faults=True)
    assert isinstance(s.health.timeout_s, float) and s.node_types["1card"].gpu_type == "a100"


def test_portal_toml_then_the_environment_override_single_health_settings(tmp_path):
    s = load(tmp_path, SITE, '[health]\ntimeout_s = 10\n', AIPORTAL_HEALTH_RESUME_AFTER_PASSES="5",
             AIPORTAL_SHARED_ROOT="/env-shared")
    assert (s.health.timeout_s, s.health.resume_after_passes, s.health.state_dir) == (10.0, 5, "/var/lib/h")
    assert (s.shared_root, s.health.shared_root) == ("/env-shared", "/env-shared")


def test_types_from_the_environment(tmp_path):
    s = load(tmp_path, AIPORTAL_HEALTH_SKIP_CHECKS="munge,apptainer", AIPORTAL_HEALTH_DEV_FAULTS="true",
             AIPORTAL_HEALTH_RESUME_AFTER_PASSES="5", AIPORTAL_HEALTH_GPU_FATAL_XIDS="48, 79",
             AIPORTAL_NOTIFY_BACKOFF_S="2.5")
    c = s.health
    assert c.skip_checks == ("munge", "apptainer") and c.dev_faults is True and c.resume_after_passes == 5
    assert c.gpu_fatal_xids == (48, 79)
    assert s.notify_backoff_s == 2.5


def test_defaults_without_any_file(tmp_path):
    s = load(tmp_path)
    assert s.health == HealthConfig()


@pytest.mark.parametrize("env,message", [
    ({"AIPORTAL_HEALTH_DEV_FAULTS": "maybe"}, r"health.dev_faults = 'maybe' is not a valid bool"),
    ({"AIPORTAL_HEALTH_TIMEOUT_S": "soon"}, r"health.timeout_s = 'soon' is not a valid float"),
    ({"AIPORTAL_HEALTH_GPU_FATAL_XIDS": "48,x"}, r"health.gpu_fatal_xids = '48,x' is not a valid tuple\[int"),
    ({"AIPORTAL_HEALTH_TIMEOUT": "10"}, r"AIPORTAL_HEALTH_TIMEOUT is not a health setting; known: .*"
                                        r"AIPORTAL_HEALTH_TIMEOUT_S"),
    ({"AIPORTAL_HEALTH_SLURM_CONF": "/x"}, r"AIPORTAL_HEALTH_SLURM_CONF: the health check uses the site's "
                                           r"slurm_conf; set AIPORTAL_SLURM_CONF instead"),
    ({"AIPORTAL_HEALTH_SHARED_ROOT": "/x"}, r"set AIPORTAL_SHARED_ROOT instead"),
])
def test_bad_environment_is_named(tmp_path, env, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, **env)


@pytest.mark.parametrize("text,message", [
    ('[health]\nslurm_conf = "/x"\n', r"site.toml: \[health\] slurm_conf: the health check uses the site's slurm_conf; "
                                      r"set it once, at the top of the file"),
    ('[health]\nshared_root = "/x"\n', r"\[health\] shared_root"),
    ('[health]\ntimeout = 10\n', r"unknown settings in \[health\]: timeout; known: .*timeout_s"),
    ('health = 3\n', r"site.toml: health must be a table"),
    ('[health]\nresume_after_passes = 2.5\n', r"health.resume_after_passes = 2.5 is not a valid int"),
    ('[health]\ntimeout_s = true\n', r"health.timeout_s = True is not a valid float"),
    ('[health]\ndev_faults = 1\n', r"health.dev_faults = 1 is not a valid bool"),
    # a site.toml of before the [health] table says where its settings went
    ('health_timeout_s = 20.0\nhealth_dev_faults = true\n',
     r"unknown settings health_dev_faults, health_timeout_s; the health settings moved into the \[health\] table: "
     r"write health_dev_faults as dev_faults, health_timeout_s as timeout_s"),
])
def test_bad_site_toml_is_named_with_the_fix(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)


@pytest.mark.parametrize("health,message", [
    ({"timeout_s": 60}, "health.timeout_s 60.0: Slurm kills HealthCheckProgram after 60 s"),
    ({"timeout_s": 55}, "health.timeout_s 55.0: Slurm kills"),
    ({"probe_timeout_s": 30, "timeout_s": 20}, r"health.probe_timeout_s \(30.0\) must be above 0 and below "
                                               r"health.timeout_s \(20.0\)"),
    ({"probe_timeout_s": 0}, "must be above 0"),
    ({"resume_after_passes": 0}, "health.resume_after_passes must be at least 1, got 0"),
])
def test_thresholds_are_checked(health, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_mapping({"health": health}, require_secrets=False)


def test_thresholds_pass_just_inside_their_limits():
    c = Settings.from_mapping({"health": {"timeout_s": 54.9, "probe_timeout_s": 54.8, "resume_after_passes": 1}},
                              require_secrets=False).health
    assert (c.timeout_s, c.probe_timeout_s, c.resume_after_passes) == (54.9, 54.8, 1)


def test_the_shared_settings_follow_the_top_level_ones_however_settings_are_built():
    s = Settings(slurm_conf="/a/slurm.conf", shared_root="/a/shared", health=HealthConfig(timeout_s=10))
    assert (s.health.slurm_conf, s.health.shared_root, s.health.timeout_s) == ("/a/slurm.conf", "/a/shared", 10)
    t = replace(s, shared_root="/b")
    assert t.health.shared_root == "/b" and t.health.timeout_s == 10


def test_the_health_namespace_of_the_environment_is_the_health_tables():
    """AIPORTAL_HEALTH_X always means health.x: no top-level setting may start with health_."""
    assert not [f.name for f in fields(Settings) if f.name.startswith("health_")]
    assert set(HEALTH_SHARED) <= {f.name for f in fields(HealthConfig)} & {f.name for f in fields(Settings)}


def test_secrets_are_refused_in_site_toml(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text('notify_webhook_secret = "x"\nnotify_smtp_password = "y"\n')
    with pytest.raises(ConfigError, match="notify_smtp_password, notify_webhook_secret: site.toml is readable"):
        Settings.load(path="/nonexistent", site_path=site, require_secrets=False, environ={})

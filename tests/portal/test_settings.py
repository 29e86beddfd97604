import pytest

from portal.errors import ConfigError
from portal.settings import NodeType, Settings

SECRETS = {"secret_key": "k" * 32, "admin_token_sha256": "0" * 64, "data_key": "d" * 44}


def test_from_mapping_builds_typed_node_types():
    s = Settings.from_mapping({**SECRETS, "node_types": {
        "1card": {"partition": "gpu-1card", "gpus": 1, "gpu_type": "p40", "cpus": 8, "memory_mb": 32000}}})
    assert s.node_types["1card"] == NodeType("1card", "gpu-1card", 1, "p40", 8, 32000)


@pytest.mark.parametrize("missing", ["secret_key", "admin_token_sha256", "data_key"])
def test_missing_secret_fails_and_names_it(missing):
    values = {k: v for k, v in SECRETS.items() if k != missing}
    with pytest.raises(ConfigError, match="'%s' is missing; there is no default for secrets" % missing):
        Settings.from_mapping(values)


def test_unknown_setting_is_an_error():
    with pytest.raises(ConfigError, match="unknown settings colour"):
        Settings.from_mapping({**SECRETS, "colour": "red"})


def test_load_file_then_environment_wins(tmp_path):
    cfg = tmp_path / "portal.toml"
    cfg.write_text('secret_key = "from-file"\nadmin_token_sha256 = "%s"\ndata_key = "k"\ncluster_name = "file"\n' % ("a" * 64))
    s = Settings.load(environ={"AIPORTAL_CONFIG": str(cfg), "AIPORTAL_CLUSTER_NAME": "env",
                               "AIPORTAL_SITE_CONFIG": str(tmp_path / "no-site.toml"),
                               "AIPORTAL_SLURM_TIMEOUT_S": "3", "UNRELATED": "x"})
    assert (s.secret_key, s.cluster_name, s.slurm_timeout_s) == ("from-file", "env", 3.0)


def test_load_names_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; set AIPORTAL_CONFIG"):
        Settings.load(environ={"AIPORTAL_CONFIG": str(tmp_path / "nope.toml")})


def test_load_reports_bad_toml(tmp_path):
    cfg = tmp_path / "portal.toml"
    cfg.write_text("secret_key = \n")
    with pytest.raises(ConfigError, match="cannot read settings file"):
        Settings.load(environ={"AIPORTAL_CONFIG": str(cfg)})


def test_settings_are_frozen():
    s = Settings.from_mapping(SECRETS)
    with pytest.raises(AttributeError):
        s.secret_key = "other"


def test_site_then_portal_file_then_environment(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text('cluster_name = "site"\nshared_root = "/shared"\nstage_bin = "/opt/x/bin/aiportal"\n'
                    '[node_types]\n1card = { partition = "p1", gpus = 1, gpu_type = "a100", cpus = 4, memory_mb = 1000 }\n')
    portal = tmp_path / "portal.toml"
    portal.write_text('secret_key = "k"\nadmin_token_sha256 = "%s"\ndata_key = "k"\ncluster_name = "portal"\n' % ("b" * 64))
    s = Settings.load(environ={"AIPORTAL_SITE_CONFIG": str(site), "AIPORTAL_CONFIG": str(portal),
                               "AIPORTAL_SHARED_ROOT": "/env"})
    assert (s.cluster_name, s.shared_root, s.stage_bin) == ("portal", "/env", "/opt/x/bin/aiportal")
    assert s.node_types["1card"].gpu_type == "a100" and list(s.node_types) == ["1card"]


def test_tools_on_nodes_load_without_secrets(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text('cluster_name = "site"\n')
    s = Settings.load(environ={"AIPORTAL_SITE_CONFIG": str(site), "AIPORTAL_CONFIG": str(tmp_path / "none.toml")},
                      require_secrets=False)
    assert s.cluster_name == "site" and s.secret_key == ""
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.load(environ={"AIPORTAL_SITE_CONFIG": str(site), "AIPORTAL_CONFIG": str(tmp_path / "none.toml")})

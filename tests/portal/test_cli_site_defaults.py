"""Where the CLI finds the portal and whom it trusts for its certificate (pure: a site.toml
of the test's own), and the session cookie's Secure flag following portal_url."""
import pytest

from portal.cli.client import DEFAULT_URL, CliError, site_defaults
from portal.settings import Settings


def test_site_toml_names_the_portal_and_its_ca(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text('portal_url = "https://portal.example:8443"\nportal_ca_file = "/etc/ssl/site-ca.pem"\n')
    env = {"AIPORTAL_SITE_CONFIG": str(site)}
    assert site_defaults(env) == ("https://portal.example:8443", "/etc/ssl/site-ca.pem")
    # the environment wins over site.toml
    assert site_defaults({**env, "AIPORTAL_URL": "https://other:1", "AIPORTAL_CA": "/x.pem"}) == ("https://other:1", "/x.pem")


def test_no_site_toml_means_the_built_in_default_and_the_system_cas(tmp_path):
    assert site_defaults({"AIPORTAL_SITE_CONFIG": str(tmp_path / "none.toml")}) == (DEFAULT_URL, "")


def test_a_broken_site_toml_is_an_error_naming_it(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text("portal_url = \n")
    with pytest.raises(CliError, match="cannot read the site settings %s" % site):
        site_defaults({"AIPORTAL_SITE_CONFIG": str(site)})


@pytest.mark.parametrize("url, secure", [("https://127.0.0.1:8443", True), ("HTTPS://portal", True),
                                         ("http://127.0.0.1:8000", False)])
def test_the_session_cookie_is_secure_where_the_portal_is_served_over_https(url, secure):
    from portal.app import create_app
    from portal.db import make_engine
    from cryptography.fernet import Fernet
    settings = Settings(portal_url=url, secret_key="k" * 32, data_key=Fernet.generate_key().decode())
    app = create_app(settings=settings, engine=make_engine("sqlite://"), test_config={"TESTING": True})
    assert settings.served_over_https is secure and app.config["SESSION_COOKIE_SECURE"] is secure

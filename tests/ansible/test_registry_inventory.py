"""The registry in the inventories, without touching a host: the example site names its external
registry in site.toml (what the portal reads as site_registry) and its `registry` group is the
hosts that must trust its CA; the dev cluster runs its own on localhost:5000."""
import json
import os
import subprocess

import pytest

from tests.ansible.test_playbooks import ANSIBLE, ansible_playbook
from tests.conftest import REPO


def site_toml(inventory, out):
    res = ansible_playbook("-i", inventory, "render-config.yml", "-e", "aiportal_render_dir=%s" % out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return (out / "site.toml").read_text().splitlines()


@pytest.mark.parametrize("inventory, address", [
    ("inventories/example-cluster", "registry.example.org"),
    ("inventories/dev", "localhost:5000"),
])
def test_site_toml_names_the_site_registry(inventory, address, tmp_path):
    assert 'site_registry = "%s"' % address in site_toml(inventory, tmp_path)


def inventory(name):
    env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"))
    res = subprocess.run([str(REPO / ".venv/bin/ansible-inventory"), "-i", name, "--list"], capture_output=True,
                         text=True, cwd=ANSIBLE, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def hosts_of(inv, group):
    """Every host of a group, through its children."""
    entry = inv.get(group, {})
    hosts = set(entry.get("hosts", []))
    for child in entry.get("children", []):
        hosts |= hosts_of(inv, child)
    return hosts


def test_example_site_trusts_its_external_registry_on_every_host_that_pulls_or_pushes():
    inv = inventory("inventories/example-cluster")
    assert hosts_of(inv, "registry") == (hosts_of(inv, "slurm_compute") | hosts_of(inv, "login")
                                         | hosts_of(inv, "portal"))
    assert inv["_meta"]["hostvars"]["portal01"]["aiportal_registry_external"] == "registry.example.org"


def test_dev_runs_its_own_registry():
    inv = inventory("inventories/dev")
    assert hosts_of(inv, "registry") == {"dev"}
    assert inv["_meta"]["hostvars"]["dev"].get("aiportal_registry_external", "") == ""

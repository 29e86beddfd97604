"""Provisioning gives the SIF cache back to the image builder account: root-owned files there
(what root conversions left before `aiportal image convert` dropped to that account) are
repaired, and a cache that is all the builder's reports no change."""
import os
import pwd
import re
import shutil
import uuid

import pytest

from portal.settings import Settings
from tests.ansible.test_playbooks import ansible_playbook

pytestmark = [pytest.mark.ansible]

TASK = "Everything in the SIF cache belongs to the image builder account"
PLAY = """- name: The shared filesystem role alone
  hosts: "nfs_server:slurm_controller:slurm_compute:login:portal"
  become: true
  gather_facts: false
  roles: [shared_fs]
"""


def _repair(tmp_path) -> str:
    """Run the shared_fs role on the dev host; the outcome of the repair task (changed or ok)."""
    play = tmp_path / "shared_fs.yml"
    play.write_text(PLAY)
    res = ansible_playbook("-i", "inventories/dev", str(play))
    assert res.returncode == 0, res.stdout[-4000:]
    m = re.search(r"TASK \[shared_fs : %s[^\]]*\] \*+\n(\w+): \[dev\]" % re.escape(TASK), res.stdout)
    assert m, res.stdout[-3000:]
    return m.group(1)


def test_root_owned_files_in_the_cache_are_given_to_the_builder_once(tmp_path):
    settings = Settings.load(require_secrets=False)
    builder = pwd.getpwnam(settings.image_builder_user)
    # what `apptainer build` as root leaves: a 0700 folder of root's in the builder's Apptainer cache
    junk = os.path.join(settings.image_cache, "apptainer", "cache", "cache", "zz-root-%s" % uuid.uuid4().hex[:8])
    os.mkdir(junk, 0o700)
    with open(os.path.join(junk, "blob"), "w") as f:
        f.write("x")
    try:
        assert _repair(tmp_path) == "changed"
        for path in (junk, os.path.join(junk, "blob")):
            st = os.lstat(path)
            assert (st.st_uid, st.st_gid) == (builder.pw_uid, builder.pw_gid), path
        assert os.stat(junk).st_mode & 0o777 == 0o700          # owners repaired, modes left alone
        assert _repair(tmp_path) == "ok"
    finally:
        shutil.rmtree(junk, ignore_errors=True)

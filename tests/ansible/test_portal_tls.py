"""The portal role's TLS tasks (ansible/roles/portal/tasks/tls.yml) with a site's own
certificate, run on this host by a playbook of the test's own into a folder of its own: the
certificate and key are copied root-only and a change is reported (nginx restarts to read it);
a certificate without its key stops the run naming both variables. The dev-CA path is what
`make provision` runs (tests/portal/test_live_portal.py checks what it serves)."""
from __future__ import annotations

import os
import subprocess
import textwrap

from tests.ansible.test_playbooks import ANSIBLE, ansible_playbook


def _site_cert(tmp_path):
    key, crt = tmp_path / "site.key", tmp_path / "site.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-noenc",
                    "-keyout", str(key), "-out", str(crt), "-subj", "/CN=portal.example", "-days", "1"],
                   check=True, capture_output=True, timeout=60)
    return crt, key


def _play(tmp_path, cert: str, key: str):
    play = tmp_path / "tls.yml"
    play.write_text(textwrap.dedent("""\
        - hosts: localhost
          connection: local
          gather_facts: false
          vars:
            ansible_python_interpreter: "{{ ansible_playbook_python }}"
            aiportal_portal_tls: true
            aiportal_portal_tls_cert: "%s"
            aiportal_portal_tls_key: "%s"
            aiportal_portal_tls_dir: "%s"
          tasks:
            - ansible.builtin.import_tasks: %s
            - ansible.builtin.debug: {msg: "changed={{ _portal_cert_changed }}"}
          handlers:
            - name: restart nginx
              ansible.builtin.debug: {msg: "nginx restarted for the new certificate"}
        """ % (cert, key, tmp_path / "tls", ANSIBLE / "roles" / "portal" / "tasks" / "tls.yml")))
    return ansible_playbook("-i", "localhost,", str(play), timeout=300)


def test_a_sites_own_certificate_is_installed_root_only_and_reported_changed(tmp_path):
    crt, key = _site_cert(tmp_path)
    first = _play(tmp_path, str(crt), str(key))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert "changed=True" in first.stdout
    assert "nginx restarted for the new certificate" in first.stdout      # the role's handler is told
    dest = tmp_path / "tls"
    assert (dest / "portal.crt").read_bytes() == crt.read_bytes() and (dest / "portal.key").read_bytes() == key.read_bytes()
    assert os.stat(dest).st_mode & 0o777 == 0o700
    assert os.stat(dest / "portal.key").st_mode & 0o777 == 0o600 and os.stat(dest / "portal.key").st_uid == 0
    again = _play(tmp_path, str(crt), str(key))
    assert again.returncode == 0 and "changed=False" in again.stdout, again.stdout[-3000:]
    assert "nginx restarted" not in again.stdout


def test_a_certificate_without_its_key_stops_the_run_naming_both(tmp_path):
    crt, _ = _site_cert(tmp_path)
    res = _play(tmp_path, str(crt), "")
    assert res.returncode != 0
    assert "aiportal_portal_tls_cert and aiportal_portal_tls_key go together" in res.stdout, res.stdout[-3000:]
    assert not (tmp_path / "tls").exists()

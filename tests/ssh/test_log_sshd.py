"""The loopback sshd the portal tails logs through: key-only, host key pinned."""
import subprocess

import paramiko
import pytest

pytestmark = pytest.mark.ssh

HOST, PORT = "127.0.0.1", 2222
KEY = "/etc/aiportal/ssh/portal_ed25519"
KNOWN_HOSTS = "/etc/aiportal/ssh/known_hosts"


def pinned_client():
    c = paramiko.SSHClient()
    c.load_host_keys(KNOWN_HOSTS)
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    return c


def test_key_login_as_the_user_works_with_the_pinned_host_key():
    c = pinned_client()
    try:
        c.connect(HOST, PORT, username="alice", key_filename=KEY, look_for_keys=False,
                  allow_agent=False, timeout=10)
        _, out, _ = c.exec_command("id -un", timeout=10)
        assert out.read().decode().strip() == "alice"
    finally:
        c.close()


def test_password_login_is_refused():
    t = paramiko.Transport((HOST, PORT))
    try:
        t.start_client(timeout=10)
        with pytest.raises(paramiko.BadAuthenticationType) as err:
            t.auth_password("alice", "any-password")
        assert err.value.allowed_types == ["publickey"]
    finally:
        t.close()


@pytest.fixture(scope="module")
def throwaway_key(tmp_path_factory):
    """A key pair nobody authorized: (private key path, "type base64" public key)."""
    d = tmp_path_factory.mktemp("key")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "k")], check=True)
    return str(d / "k"), " ".join((d / "k.pub").read_text().split()[:2])


def test_unknown_key_is_refused(throwaway_key):
    c = pinned_client()
    try:
        with pytest.raises(paramiko.AuthenticationException):
            c.connect(HOST, PORT, username="alice", key_filename=throwaway_key[0], look_for_keys=False,
                      allow_agent=False, timeout=10)
    finally:
        c.close()


def test_root_login_is_refused():
    c = pinned_client()
    try:
        with pytest.raises(paramiko.AuthenticationException):
            c.connect(HOST, PORT, username="root", key_filename=KEY, look_for_keys=False,
                      allow_agent=False, timeout=10)
    finally:
        c.close()


def test_a_host_key_that_does_not_match_the_pin_is_rejected(tmp_path, throwaway_key):
    other = tmp_path / "known_hosts"
    other.write_text("[127.0.0.1]:2222 %s\n" % throwaway_key[1])
    c = paramiko.SSHClient()
    c.load_host_keys(str(other))
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        with pytest.raises(paramiko.BadHostKeyException):
            c.connect(HOST, PORT, username="alice", key_filename=KEY, look_for_keys=False,
                      allow_agent=False, timeout=10)
    finally:
        c.close()

"""The `aiportal` CLI against the running portal."""
import json
import subprocess

import pytest

from tests.conftest import JOB_AIPORTAL_VENV, REPO

AIPORTAL = str(REPO / ".venv" / "bin" / "aiportal")


def cli(*args, env=None):
    return subprocess.run([AIPORTAL, *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.portal
@pytest.mark.slurm
def test_cluster_table_and_json():
    token = "/etc/aiportal/secrets/admin_token"
    table = cli("--token-file", token, "cluster")
    assert table.returncode == 0, table.stderr
    assert "of 11 GPUs in use" in table.stdout
    assert "gpu-1card*" in table.stdout
    raw = cli("--token-file", token, "cluster", "--json")
    assert {n["name"] for n in json.loads(raw.stdout)["nodes"]} == {"g1n1", "g1n2", "g4n1", "g4n2", "inf1"}


@pytest.mark.portal
def test_wrong_token_is_reported_with_the_api_error(tmp_path):
    bad = tmp_path / "token"
    bad.write_text("wrong")
    res = cli("--token-file", str(bad), "cluster")
    assert res.returncode == 2
    assert res.stderr.startswith("aiportal: the portal at https://127.0.0.1:8443 refused the API token from %s" % bad)
    assert "aiportal token create --user NAME" in res.stderr


@pytest.mark.portal
def test_the_cli_finds_the_portal_in_site_toml_and_checks_its_certificate(tmp_path):
    """No --url: portal_url from /etc/aiportal/site.toml (HTTPS, the dev CA in the system store);
    a CA that did not sign the portal's certificate, the plain-HTTP port, or an unreadable CA file
    each get an error that says what to pass."""
    token = "/etc/aiportal/secrets/admin_token"
    ok = cli("--token-file", token, "cluster")
    assert ok.returncode == 0 and "of 11 GPUs in use" in ok.stdout, ok.stderr

    other_key, other_ca = tmp_path / "other.key", tmp_path / "other-ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-noenc",
                    "-keyout", str(other_key), "-out", str(other_ca), "-subj", "/CN=not the site CA", "-days", "1"],
                   check=True, capture_output=True, timeout=60)
    for args, env_ca in ((["--ca", str(other_ca)], None), ([], str(other_ca))):
        env = None if env_ca is None else {"PATH": "/usr/bin:/bin", "AIPORTAL_CA": env_ca}
        res = cli(*args, "--token-file", token, "cluster", env=env)
        assert res.returncode == 2, res
        assert ("the portal at https://127.0.0.1:8443 has a certificate that %s does not vouch for" % other_ca
                in res.stderr), res.stderr
        assert "--ca FILE" in res.stderr

    missing = cli("--ca", str(tmp_path / "none.pem"), "--token-file", token, "cluster")
    assert missing.returncode == 2 and "cannot use %s as the CA file" % (tmp_path / "none.pem") in missing.stderr

    # the plain port only redirects: the CLI follows no redirect (the token would go along) and
    # says where the portal is, for a GET and a POST alike
    for argv in (["cluster"], ["token", "create", "--name", "never-made"]):
        res = cli("--url", "http://127.0.0.1:8000", "--token-file", token, *argv)
        assert res.returncode == 2
        assert "sends its clients to https://127.0.0.1:8443: pass --url https://127.0.0.1:8443" in res.stderr, res.stderr
    # and sends no token over plain HTTP to another host
    far = cli("--url", "http://portal.example:8000", "--token-file", token, "cluster")
    assert far.returncode == 2 and "refusing to send the API token over plain HTTP to portal.example:8000" in far.stderr


def test_missing_token_file_says_what_to_do(tmp_path):
    res = cli("--token-file", str(tmp_path / "none"), "cluster")
    assert res.returncode == 2
    assert "pass --token-file FILE or set AIPORTAL_TOKEN" in res.stderr


def test_unreachable_portal_says_so(tmp_path):
    tok = tmp_path / "token"
    tok.write_text("x")
    res = cli("--url", "http://127.0.0.1:9199", "--token-file", str(tok), "cluster")
    assert res.returncode == 2
    assert "cannot reach the portal at http://127.0.0.1:9199" in res.stderr


def test_script_prints_the_batch_script_for_a_node_type(tmp_path):
    sif = tmp_path / "img.sif"
    res = cli("script", "--image", str(sif), "--node-type", "4card", "--input", "/shared/in",
              "--output", "/shared/out", "--env", "LR=0.1", "--name", "demo", "--", "python3", "train.py", "--x", "a b")
    assert res.returncode == 0, res.stderr
    assert "#SBATCH --partition=gpu-4card" in res.stdout and "#SBATCH --gres=gpu:4" in res.stdout
    assert "#SBATCH --cpus-per-task=48" in res.stdout and "#SBATCH --mem=256000M" in res.stdout
    assert "export LR=0.1" in res.stdout
    assert "%s python3 train.py --x 'a b' &" % sif in res.stdout
    # as root (this test): nothing is created, and it says how to run it
    assert "as root nothing was created" in res.stderr and "mkdir -p" in res.stderr and "/logs" in res.stderr
    assert 'export AIPORTAL_JOB_DIR=/' in res.stdout and '/run-"${SLURM_JOB_ID:-0}"' in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--node-type", "8card", "--", "x"], "unknown node type; choose one of 1card, 4card, infer"),
    (["--node-type", "1card"], "give the command after --"),
    (["--node-type", "1card", "--env", "NOEQUALS", "--", "x"], "write it as NAME=VALUE"),
    (["--node-type", "1card", "--time", "forever", "--", "x"], "use minutes, HH:MM:SS"),
])
def test_script_errors_name_the_input(args, message):
    res = cli("script", "--image", "/x.sif", *args)
    assert res.returncode == 2
    assert message in res.stderr


def test_script_with_an_unconverted_reference_says_how_to_convert(tmp_path):
    archive = tmp_path / "never-seen.tar"
    archive.write_bytes(b"not really an archive")
    res = cli("script", "--image", "docker-archive:%s" % archive, "--node-type", "1card", "--", "true")
    assert res.returncode == 2
    assert "is not converted yet; run `aiportal image convert" in res.stderr


def test_stage_in_and_out_through_the_cli(tmp_path):
    (tmp_path / "src" / "d").mkdir(parents=True)
    (tmp_path / "src" / "d" / "f.txt").write_text("x")
    res = cli("stage", "in", "--from", str(tmp_path / "src"), "--to", str(tmp_path / "job"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "job" / "d" / "f.txt").read_text() == "x"
    assert "1 files: 1 copied" in res.stderr
    again = cli("stage", "out", "--from", str(tmp_path / "job"), "--to", str(tmp_path / "src"))
    assert "0 copied" in again.stderr and "1 already up to date" in again.stderr
    missing = cli("stage", "in", "--from", str(tmp_path / "nope"), "--to", str(tmp_path / "x"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert cli("stage", "in", "--from", str(tmp_path / "nope"), "--to", str(tmp_path / "x"), "--missing-ok").returncode == 0


@pytest.mark.apptainer
def test_image_list_shows_the_cache():
    res = cli("image", "list", "--json")
    assert res.returncode == 0, res.stderr
    assert isinstance(json.loads(res.stdout), list)


def test_image_convert_refuses_users_who_cannot_write_the_cache(tmp_path):
    res = subprocess.run(["runuser", "-u", "alice", "--", str(JOB_AIPORTAL_VENV / "bin" / "aiportal"),
                          "image", "convert", "/x.sif"], capture_output=True, text=True, timeout=60, cwd="/")
    assert res.returncode == 2
    assert "is written only by aiportal-img" in res.stderr


def test_script_with_s3_data_needs_and_passes_the_users_credentials_file(tmp_path):
    res = cli("script", "--image", "/x.sif", "--node-type", "1card", "--input", "s3://data/in", "--", "true")
    assert res.returncode == 2 and "pass --credentials FILE" in res.stderr
    creds = tmp_path / "my creds.json"
    res = cli("script", "--image", "/x.sif", "--node-type", "1card", "--input", "s3://data/in",
              "--output", "s3://data/out", "--credentials", str(creds), "--", "true")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("--credentials '%s'" % creds) == 3

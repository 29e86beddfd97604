"""The health check's files (pass counters, the dev cluster's fault markers) are root's alone:
0600 under any umask, and an older, wider file is replaced by a 0600 one."""
import os
import stat

from monitor import faults, health
from monitor.config import HealthConfig
from monitor.facts import fault_file


def mode(path) -> str:
    return "%04o" % stat.S_IMODE(os.stat(path).st_mode)


def test_pass_counter_and_fault_marker_are_0600(tmp_path):
    config = HealthConfig(state_dir=str(tmp_path))
    umask = os.umask(0o022)
    try:
        health.state_path(config, "g1n1").write_text("{}")
        os.chmod(health.state_path(config, "g1n1"), 0o644)        # an older install's
        health.write_state(config, "g1n1", {"passes": 2})
        fault_file(str(tmp_path), "g1n1").parent.mkdir()
        (fault_file(str(tmp_path), "g1n1").parent / "g1n1.json.tmp").write_text("{}")
        os.chmod(fault_file(str(tmp_path), "g1n1").parent / "g1n1.json.tmp", 0o644)   # a left-over
        faults._save(config, "g1n1", {"node": "g1n1", "modes": {"disk": {}}})
    finally:
        os.umask(umask)
    assert mode(health.state_path(config, "g1n1")) == "0600"
    assert health.read_state(config, "g1n1") == {"passes": 2}
    assert mode(fault_file(str(tmp_path), "g1n1")) == "0600"
    assert faults._state(config, "g1n1")["modes"] == {"disk": {}}

"""Parsers of what the health check reads on a node."""
import pytest

from monitor.errors import ParseError
from monitor.parse import (expand_hostlist, gres_conf_gpu_files, mount_of, parse_nvidia_smi, parse_xids,
                           slurmd_gres_gpus)


@pytest.mark.parametrize("text,want", [
    ("g1n1", ["g1n1"]),
    ("g1n[01-03]", ["g1n01", "g1n02", "g1n03"]),
    ("g1n[1-2,7],inf1", ["g1n1", "g1n2", "g1n7", "inf1"]),
    ("/dev/nvidia[0-3]", ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidia3"]),
    ("/var/lib/aiportal/fakegpu/g4n1/nvidia[0-1]", ["/var/lib/aiportal/fakegpu/g4n1/nvidia0",
                                                   "/var/lib/aiportal/fakegpu/g4n1/nvidia1"]),
])
def test_expand_hostlist(text, want):
    assert expand_hostlist(text) == want


@pytest.mark.parametrize("bad", ["g[1-", "g[a-b]", "g[3-1]"])
def test_bad_hostlists_are_named(bad):
    with pytest.raises(ParseError):
        expand_hostlist(bad)


GRES = """# Managed by aiportal
AutoDetect=off
NodeName=g1n1 Name=gpu Type=p40 File=/var/lib/aiportal/fakegpu/g1n1/nvidia0
NodeName=g4n1 Name=gpu Type=p40 File=/var/lib/aiportal/fakegpu/g4n1/nvidia[0-3]
NodeName=g4n[01-04] Name=gpu Type=p40 File=/dev/nvidia[0-3]
Name=gpu File=/dev/nvidia9
"""


def test_gres_conf_files_of_one_node():
    assert gres_conf_gpu_files(GRES, "g1n1") == ["/var/lib/aiportal/fakegpu/g1n1/nvidia0", "/dev/nvidia9"]
    assert len(gres_conf_gpu_files(GRES, "g4n1")) == 5
    assert gres_conf_gpu_files(GRES, "g4n03") == ["/dev/nvidia%d" % i for i in range(4)] + ["/dev/nvidia9"]


def test_slurmd_gres_output():
    out = "slurmd: Gres Name=gpu Type=p40 Count=4 Index=0 ID=7696487 File=/var/lib/aiportal/fakegpu/g4n1/nvidia[0-3] (null)\n"
    assert slurmd_gres_gpus(out) == 4
    assert slurmd_gres_gpus("") == 0


def test_nvidia_smi_csv():
    got = parse_nvidia_smi("0, 00000000:3B:00.0, No\n1, 00000000:5E:00.0, Yes\n2, 00000000:86:00.0, [N/A]\n")
    assert [(g.index, g.retired_pending) for g in got] == [(0, False), (1, True), (2, False)]
    with pytest.raises(ParseError):
        parse_nvidia_smi("0, x\n")


def test_xids_from_the_kernel_log():
    log = ("[ 12.3] NVRM: Xid (PCI:0000:3b:00): 79, pid=0, GPU has fallen off the bus.\n"
           "[ 13.0] something else\n[ 14.1] NVRM: Xid (PCI:0000:5e:00): 13, Graphics Exception\n")
    assert parse_xids(log) == [79, 13]


def test_mount_of():
    mounts = "/dev/vda / ext4 rw 0 0\nnfs:/export /shared nfs4 rw 0 0\n"
    assert mount_of(mounts, "/shared/") == ("/shared", "nfs4")
    assert mount_of(mounts, "/srv/aiportal/shared") is None

"""The hostlist and node-table filters the Slurm templates use."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ansible" / "filter_plugins"))
from aiportal_filters import hostlist, nodes_of_type, partition_nodes, slurm_nodes  # noqa: E402


@pytest.mark.parametrize("names, expected", [
    (["g1n1"], "g1n1"),
    (["g1n1", "g1n2"], "g1n[1-2]"),
    (["g1n01", "g1n02", "g1n03", "g1n05"], "g1n[01-03,05]"),
    (["g1n03", "g1n01", "g1n02"], "g1n[01-03]"),
    (["g1n1", "g1n1"], "g1n1"),
    (["n9", "n10", "n11"], "n9,n[10-11]"),          # widths differ: Slurm keeps them apart
    (["login", "g4n1", "g4n2"], "login,g4n[1-2]"),
    (["inf01", "inf02", "g4n01"], "inf[01-02],g4n01"),
    ([], ""),
])
def test_hostlist(names, expected):
    assert hostlist(names) == expected


@pytest.mark.parametrize("bad", [[""], ["a,b"], ["g[1]"], ["has space"]])
def test_hostlist_rejects_names_slurm_cannot_hold(bad):
    with pytest.raises(ValueError, match="host names"):
        hostlist(bad)


TYPES = {"1card": {}, "4card": {}, "infer": {}}


def test_slurm_nodes_from_groups_keeps_group_order():
    groups = {"gpu_1card": ["a1", "a2"], "gpu_4card": ["b1"], "infer": []}
    nodes = slurm_nodes({"1card": "gpu_1card", "4card": "gpu_4card", "infer": "infer"}, groups, TYPES)
    assert nodes == [{"name": "a1", "type": "1card"}, {"name": "a2", "type": "1card"},
                     {"name": "b1", "type": "4card"}]
    assert nodes_of_type(nodes, "1card") == ["a1", "a2"]
    assert partition_nodes(nodes, ["4card", "infer"]) == ["b1"]


def test_slurm_nodes_missing_group_is_empty():
    assert slurm_nodes({"1card": "nope"}, {}, TYPES) == []


def test_slurm_nodes_unknown_type_names_the_type_and_the_choices():
    with pytest.raises(ValueError, match=r"'8card' is not in aiportal_node_types \(1card, 4card, infer\)"):
        slurm_nodes({"8card": "gpu_8card"}, {"gpu_8card": ["x"]}, TYPES)

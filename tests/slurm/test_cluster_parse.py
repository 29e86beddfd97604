"""Pure parsers of sinfo output and the node state table."""
import logging

import pytest

from slurm.cluster import SEP, Gres, NodeState, parse_gres, parse_gres_used, parse_node_state, parse_sinfo_nodes
from slurm.errors import SlurmParseError


@pytest.mark.parametrize("text, state, responding", [
    ("idle", NodeState.IDLE, True),
    ("mixed", NodeState.MIXED, True),
    ("allocated", NodeState.ALLOCATED, True),
    ("completing", NodeState.COMPLETING, True),
    ("draining", NodeState.DRAINING, True),
    ("drained", NodeState.DRAINED, True),
    ("drained*", NodeState.DRAINED, False),
    ("down*", NodeState.DOWN, False),
    ("idle~", NodeState.IDLE, True),
    ("mix-", NodeState.MIXED, True),
    ("IDLE", NodeState.IDLE, True),
    ("inval", NodeState.INVALID, True),
    ("idle+drain", NodeState.IDLE, True),
    ("future", NodeState.FUTURE, True),
])
def test_node_state_table(text, state, responding):
    assert parse_node_state(text) == (state, responding)


def test_unknown_state_becomes_unknown_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert parse_node_state("exploded") == (NodeState.UNKNOWN, True)
    assert "unknown Slurm node state 'exploded'" in caplog.text


@pytest.mark.parametrize("state, schedulable", [
    (NodeState.IDLE, True), (NodeState.MIXED, True), (NodeState.DRAINING, False),
    (NodeState.DRAINED, False), (NodeState.DOWN, False), (NodeState.INVALID, False),
])
def test_schedulable(state, schedulable):
    assert state.schedulable is schedulable


@pytest.mark.parametrize("text, expected", [
    ("gpu:p40:4", (Gres("gpu", "p40", 4),)),
    ("gpu:p40:4(S:0)", (Gres("gpu", "p40", 4),)),
    ("gpu:p40:2(IDX:0-1)", (Gres("gpu", "p40", 2),)),
    ("gpu:p40:0(IDX:N/A)", (Gres("gpu", "p40", 0),)),
    ("gpu:p40:3(IDX:0,2-3)", (Gres("gpu", "p40", 3),)),
    ("gpu:2", (Gres("gpu", None, 2),)),
    ("gpu", (Gres("gpu", None, 1),)),
    ("gpu:a100:2,shard:8", (Gres("gpu", "a100", 2), Gres("shard", None, 8))),
    ("(null)", ()),
    ("", ()),
])
def test_parse_gres(text, expected):
    assert parse_gres(text) == expected


def test_parse_gres_rejects_garbage():
    with pytest.raises(SlurmParseError, match="not NAME"):
        parse_gres("gpu:p40:4:extra")


def line(*cols):
    return SEP.join(cols)


SINFO = "\n".join([
    line("g1n1", "gpu-1card", "idle", "0/8/0/8", "32000", "gpu:p40:1", "none", "7-00:00:00", "gpu-1card*"),
    line("g4n1", "gpu-4card", "mixed", "2/46/0/48", "256000", "gpu:p40:4", "none", "7-00:00:00", "gpu-4card"),
    line("g4n2", "gpu-4card", "drained*", "0/0/48/48", "256000", "gpu:p40:4",
         "aiportal: gpu check failed [root@2026-11-27T09:00:00]", "7-00:00:00", "gpu-4card"),
    line("g4n2", "debug", "drained*", "0/0/48/48", "256000", "gpu:p40:4",
         "aiportal: gpu check failed [root@2026-11-27T09:00:00]", "1:00:00", "debug"),
    line("inf1", "infer", "idle", "0/8/0/8", "32000", "gpu:p40:1", "none", "infinite", "infer"),
])
USED = "\n".join([line("g1n1", "gpu:p40:0(IDX:N/A)"), line("g4n1", "gpu:p40:2(IDX:0-1)"),
                  line("g4n2", "gpu:p40:0(IDX:N/A)"), line("inf1", "gpu:p40:0(IDX:N/A)")])


def test_parse_sinfo_nodes_merges_partitions_and_counts_gpus():
    nodes, parts = parse_sinfo_nodes(SINFO, parse_gres_used(USED))
    by = {n.name: n for n in nodes}
    assert list(by) == ["g1n1", "g4n1", "g4n2", "inf1"]
    assert by["g4n1"].gpus == 4 and by["g4n1"].gpus_used == 2 and by["g4n1"].cpus_allocated == 2
    assert by["g4n2"].partitions == ("gpu-4card", "debug")
    assert by["g4n2"].state is NodeState.DRAINED and not by["g4n2"].responding
    assert by["g4n2"].reason.startswith("aiportal: gpu check failed")
    assert by["g1n1"].reason == ""
    assert by["g1n1"].gpu_type == "p40"
    p = {x.name: x for x in parts}
    assert p["gpu-1card"].default and not p["gpu-4card"].default
    assert p["gpu-4card"].nodes == ("g4n1", "g4n2") and p["gpu-4card"].gpus == 8 and p["gpu-4card"].gpus_used == 2
    assert p["infer"].max_time == "infinite"
    d = by["g4n2"].to_dict()
    assert d["state"] == "drained" and d["schedulable"] is False


def test_parse_sinfo_nodes_wrong_field_count_names_the_line():
    with pytest.raises(SlurmParseError, match="expected 9 fields, got 2"):
        parse_sinfo_nodes(line("g1n1", "idle"))


def test_parse_sinfo_nodes_bad_number():
    with pytest.raises(SlurmParseError, match="memory 'lots' is not a number"):
        parse_sinfo_nodes(line("g1n1", "p", "idle", "0/8/0/8", "lots", "", "none", "1:00", "p"))

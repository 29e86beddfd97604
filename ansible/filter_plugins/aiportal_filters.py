"""Jinja filters for the aiportal roles: Slurm hostlists and the node table.

Kept here (not in templates) so the logic is plain Python and unit-tested
(tests/ansible/test_filters.py).
"""
from __future__ import annotations

import re
from itertools import groupby

_NAME = re.compile(r"^(.*?)(\d+)$")


def hostlist(names):
    """Compress host names the way Slurm writes them.

    >>> hostlist(["g1n01", "g1n02", "g1n03", "g1n05", "login"])
    'g1n[01-03,05],login'

    Names are grouped by prefix and digit width (``n9`` and ``n10`` stay apart, as in Slurm);
    order of first appearance of each prefix is kept.
    """
    names = list(dict.fromkeys(str(n) for n in names))
    if any(not n or any(c in n for c in ",[] ") for n in names):
        raise ValueError("host names must be non-empty and contain no ',[] ': %r" % names)
    groups = {}
    for n in names:
        m = _NAME.match(n)
        key = (m.group(1), len(m.group(2))) if m else (n, None)
        groups.setdefault(key, []).append(int(m.group(2)) if m else None)
    out = []
    for (prefix, width), nums in groups.items():
        if width is None:
            out.append(prefix)
            continue
        nums = sorted(set(nums))
        if len(nums) == 1:
            out.append("%s%0*d" % (prefix, width, nums[0]))
            continue
        ranges = []
        for _, run in groupby(enumerate(nums), key=lambda iv: iv[1] - iv[0]):
            run = [v for _, v in run]
            lo, hi = run[0], run[-1]
            ranges.append("%0*d" % (width, lo) if lo == hi else "%0*d-%0*d" % (width, lo, width, hi))
        out.append("%s[%s]" % (prefix, ",".join(ranges)))
    return ",".join(out)


def slurm_nodes(node_groups, groups, node_types):
    """Build the node table from inventory groups.

    ``node_groups`` maps a node type (``1card``) to an inventory group name; each host of that
    group becomes ``{"name": host, "type": node_type}``. Unknown node types fail loudly.
    """
    nodes = []
    for node_type, group in node_groups.items():
        if node_type not in node_types:
            raise ValueError("node type %r is not in aiportal_node_types (%s)"
                             % (node_type, ", ".join(sorted(node_types))))
        for host in groups.get(group, []):
            nodes.append({"name": host, "type": node_type})
    return nodes


def nodes_of_type(nodes, node_type):
    """Names of the nodes of one type, in table order."""
    return [n["name"] for n in nodes if n["type"] == node_type]


def partition_nodes(nodes, node_type_names):
    """Names of the nodes whose type is in ``node_type_names`` (a partition's types)."""
    wanted = set(node_type_names)
    return [n["name"] for n in nodes if n["type"] in wanted]


class FilterModule:
    def filters(self):
        return {
            "aiportal_hostlist": hostlist,
            "aiportal_slurm_nodes": slurm_nodes,
            "aiportal_nodes_of_type": nodes_of_type,
            "aiportal_partition_nodes": partition_nodes,
        }

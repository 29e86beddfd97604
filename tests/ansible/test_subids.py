"""The subordinate id filter of the registry role: which /etc/subuid lines to add (pure)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ansible" / "filter_plugins"))
from aiportal_subids import parse_subids, subid_lines  # noqa: E402

WANTED = [{"name": "alice", "start": 200000}, {"name": "bob", "start": 300000}]


@pytest.mark.parametrize("text, expected", [
    ("", ["alice:200000:65536", "bob:300000:65536"]),
    (None, ["alice:200000:65536", "bob:300000:65536"]),
    # a range made by useradd (or an admin) is kept, whatever its start
    ("alice:100000:65536\n", ["bob:300000:65536"]),
    ("alice:100000:65536\nbob:165536:65536\n", []),
    # our own earlier run: nothing again
    ("alice:200000:65536\nbob:300000:65536\n", []),
    # other users' lines, comments and junk do not count as a range for alice or bob
    ("# comment\ncarol:400000:65536\nalice\nbob:x:1\n", ["alice:200000:65536", "bob:300000:65536"]),
])
def test_lines_to_add(text, expected):
    assert subid_lines(text, WANTED) == expected


def test_count_per_entry_and_default():
    assert subid_lines("", [{"name": "alice", "start": 1000, "count": 10}], count=5) == ["alice:1000:10"]
    assert subid_lines("", [{"name": "alice", "start": 1000}], count=5) == ["alice:1000:5"]


@pytest.mark.parametrize("text, wanted, match", [
    # carol holds 265536-305535: right after alice's new range (fine), into bob's (refused)
    ("carol:265536:40000\n", WANTED, r"bob:300000:65536 overlaps carol:265536:40000 in /etc/subuid; give bob a start of 305536 or more"),
    # two new ranges overlap each other
    ("", [{"name": "alice", "start": 200000}, {"name": "bob", "start": 265535}], "bob:265535:65536 overlaps alice:200000:65536"),
    ("", [{"name": "alice", "start": 0}], "needs start >= 1"),
    ("", [{"name": "al:ice", "start": 1}], "not a user name"),
])
def test_refused(text, wanted, match):
    with pytest.raises(ValueError, match=match):
        subid_lines(text, wanted)


@pytest.mark.parametrize("text, wanted", [
    ("carol:100000:100000\n", [{"name": "alice", "start": 200000}]),     # ends right before
    ("carol:265536:10\n", [{"name": "alice", "start": 200000}]),         # starts right after
])
def test_adjacent_ranges_are_fine(text, wanted):
    assert subid_lines(text, wanted) == ["alice:200000:65536"]


def test_parse():
    assert parse_subids("a:1:2\n  \n#b:3:4\nc:5\n") == [("a", 1, 2)]

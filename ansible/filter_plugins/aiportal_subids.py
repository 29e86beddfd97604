"""Jinja filter for the registry role: the subordinate id ranges (/etc/subuid, /etc/subgid) to
add so users can build images rootless (buildah maps root of the build onto the range).

Pure and unit-tested (tests/ansible/test_subids.py): the role only appends what this returns,
so lines already there (made by useradd, by an admin, by an earlier run) are never rewritten.
"""
from __future__ import annotations

import re

_USER = re.compile(r"^[a-z_][a-z0-9_.-]*\$?$")


def parse_subids(text):
    """``name:start:count`` lines as (name, start, count); comments and malformed lines skipped."""
    ranges = []
    for line in (text or "").splitlines():
        parts = line.strip().split(":")
        if len(parts) != 3 or line.lstrip().startswith("#"):
            continue
        name, start, count = parts
        if name and start.isdigit() and count.isdigit():
            ranges.append((name, int(start), int(count)))
    return ranges


def subid_lines(text, wanted, count=65536, path="/etc/subuid"):
    """Lines to append to a subordinate id file whose content is ``text``.

    ``wanted`` is a list of ``{name, start}`` (``count`` per entry optional). A user who already
    has a range keeps it (nothing is added for them). A new range that overlaps one already in
    the file or another new one is refused with the start to change.

    >>> subid_lines("alice:100000:65536\\n", [{"name": "alice", "start": 200000}, {"name": "bob", "start": 300000}])
    ['bob:300000:65536']
    """
    existing = parse_subids(text)
    have = {name for name, _, _ in existing}
    taken = [(start, start + n, "%s:%d:%d" % (name, start, n)) for name, start, n in existing]
    out = []
    for entry in wanted or []:
        name = str(entry["name"])
        if not _USER.match(name):
            raise ValueError("aiportal_build_subids: %r is not a user name" % name)
        if name in have:
            continue
        start, n = int(entry["start"]), int(entry.get("count", count))
        if start < 1 or n < 1:
            raise ValueError("aiportal_build_subids: %s needs start >= 1 and count >= 1, got %d and %d"
                             % (name, start, n))
        for lo, hi, line in taken:
            if start < hi and lo < start + n:
                raise ValueError("aiportal_build_subids: %s:%d:%d overlaps %s in %s; give %s a start "
                                 "of %d or more" % (name, start, n, line, path, name, max(h for _, h, _ in taken)))
        line = "%s:%d:%d" % (name, start, n)
        taken.append((start, start + n, line))
        have.add(name)
        out.append(line)
    return out


class FilterModule:
    def filters(self):
        return {"aiportal_subid_lines": subid_lines}

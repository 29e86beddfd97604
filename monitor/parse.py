"""Pure parsers for what the health check reads on a node: gres.conf, ``slurmd -G``,
``nvidia-smi`` CSV, kernel-log XID lines, /proc/self/mounts, and Slurm host lists."""
from __future__ import annotations

import re
from dataclasses import dataclass

from monitor.errors import ParseError

_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(text: str) -> list[str]:
    """``g1n[01-03,7],inf1`` -> ``[g1n01, g1n02, g1n03, g1n7, inf1]``; also file names such as
    ``/dev/nvidia[0-3]``. One bracket group per name (what Slurm writes for nodes and devices);
    zero padding is kept."""
    out: list[str] = []
    for item in re.split(r",(?![^\[]*\])", text.strip()):
        if not item:
            continue
        m = re.match(r"^(?P<pre>[^\[\]]*)\[(?P<body>[^\[\]]+)\](?P<post>[^\[\]]*)$", item)
        if not m:
            if "[" in item or "]" in item:
                raise ParseError(text, "host list item %r has unbalanced or nested brackets" % item)
            out.append(item)
            continue
        for part in m.group("body").split(","):
            r = _RANGE_RE.match(part.strip())
            if not r:
                raise ParseError(text, "range %r is not N or N-M" % part)
            lo, hi = r.group(1), r.group(2) or r.group(1)
            if int(hi) < int(lo):
                raise ParseError(text, "range %r goes backwards" % part)
            width = len(lo) if lo.startswith("0") else 0
            for i in range(int(lo), int(hi) + 1):
                out.append("%s%0*d%s" % (m.group("pre"), width, i, m.group("post")))
    return out


def _key_values(line: str) -> dict[str, str]:
    """``NodeName=a Name=gpu File=/dev/x`` -> dict (keys case-insensitive, lower-cased)."""
    out = {}
    for token in line.split():
        key, sep, value = token.partition("=")
        if sep:
            out[key.lower()] = value
    return out


def gres_conf_gpu_files(text: str, node: str) -> list[str]:
    """Device files of ``Name=gpu`` entries in gres.conf that apply to ``node`` (lines with
    its name in ``NodeName=``, or with no NodeName at all), host-list expanded, in order."""
    files: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kv = _key_values(line)
        if kv.get("name") != "gpu" or "file" not in kv:
            continue
        if "nodename" in kv and node not in expand_hostlist(kv["nodename"]):
            continue
        files.extend(expand_hostlist(kv["file"]))
    return files


def slurmd_gres_gpus(text: str) -> int:
    """GPU count in ``slurmd -G`` output (``slurmd: Gres Name=gpu Type=p40 Count=4 ...``)."""
    total = 0
    for line in text.splitlines():
        if "Gres " not in line:
            continue
        kv = _key_values(line.split("Gres ", 1)[1])
        if kv.get("name") == "gpu":
            try:
                total += int(kv.get("count", "1"))
            except ValueError as e:
                raise ParseError(line, "Count is not a number") from e
    return total


@dataclass(frozen=True)
class GpuStatus:
    """One GPU as ``nvidia-smi --query-gpu=index,pci.bus_id,retired_pages.pending`` reports it."""

    index: int
    bus_id: str
    retired_pending: bool


SMI_QUERY = "index,pci.bus_id,retired_pages.pending"


def parse_nvidia_smi(text: str) -> list[GpuStatus]:
    """``nvidia-smi --query-gpu=SMI_QUERY --format=csv,noheader,nounits`` lines. A GPU or
    driver without page retirement prints ``[N/A]`` (or ``[Not Supported]``): not pending."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cols = [c.strip() for c in line.split(",")]
        if len(cols) != 3:
            raise ParseError(line, "expected 3 nvidia-smi columns (%s)" % SMI_QUERY)
        try:
            index = int(cols[0])
        except ValueError as e:
            raise ParseError(line, "GPU index is not a number") from e
        out.append(GpuStatus(index, cols[1], cols[2].lower() in ("yes", "1", "true")))
    return out


_XID_RE = re.compile(r"NVRM: Xid \((?P<dev>[^)]*)\): (?P<xid>\d+)")


def parse_xids(text: str) -> list[int]:
    """XID numbers in kernel log lines (``NVRM: Xid (PCI:0000:3b:00): 79, pid=...``)."""
    return [int(m.group("xid")) for m in _XID_RE.finditer(text)]


def mount_of(mounts_text: str, path: str) -> tuple[str, str] | None:
    """(mount point, filesystem type) of the mount ``path`` sits on exactly (a mount point),
    from /proc/self/mounts; None when ``path`` is not itself a mount point."""
    want = path.rstrip("/") or "/"
    found = None
    for line in mounts_text.splitlines():
        cols = line.split()
        if len(cols) < 3:
            continue
        point = cols[1].replace("\\040", " ")
        if point == want:
            found = (point, cols[2])      # the last one mounted there wins
    return found

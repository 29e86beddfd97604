"""A small, pure reader of Apptainer definition files: header keywords and sections.

Enough to check a definition's shape in tests and to find the host files a build reads
(``%files`` sources and a ``localimage``/archive ``From:``), which the image cache folds into a
definition's digest. Not a full parser: ``{{ ARG }}`` templates are left as written.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_SECTION = re.compile(r"^%([A-Za-z][A-Za-z0-9_-]*)\b[ \t]*(.*)$")
_HEADER = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*)\s*:\s*(.*)$")

#: Sections apptainer knows (a misspelt one is an error in the definition).
KNOWN_SECTIONS = frozenset({"arguments", "setup", "files", "post", "environment", "runscript",
                            "startscript", "test", "labels", "help", "pre",
                            "appinstall", "appfiles", "appenv", "apprun", "applabels",
                            "apphelp", "apptest", "appstart"})

#: Bootstrap agents whose ``From:`` is a file on the build host.
LOCAL_FROM_BOOTSTRAPS = frozenset({"localimage", "docker-archive", "oci-archive"})


@dataclass(frozen=True)
class Section:
    """One ``%name args`` section; ``body`` is its text without the header line."""

    name: str
    args: str
    body: str


@dataclass(frozen=True)
class Definition:
    """Header keywords (lower-cased keys, first stage) and sections in file order."""

    header: dict[str, str]
    sections: tuple[Section, ...] = field(default_factory=tuple)

    def section(self, name: str) -> Section | None:
        """The first section called ``name``, or None."""
        return next((s for s in self.sections if s.name == name), None)

    def file_sources(self) -> list[str]:
        """Host paths that ``%files`` sections copy in, as written (relative ones are resolved
        against the build's working directory). ``%files from STAGE`` sections are skipped:
        they copy from another stage, not from the host."""
        out = []
        for s in self.sections:
            if s.name != "files" or s.args.split()[:1] == ["from"]:
                continue
            for line in s.body.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append(line.split()[0])
        return out

    def local_from(self) -> str | None:
        """The ``From:`` path when the bootstrap agent reads a local file, else None."""
        if self.header.get("bootstrap", "").lower() in LOCAL_FROM_BOOTSTRAPS:
            return self.header.get("from") or None
        return None


def parse_definition(text: str) -> Definition:
    """Split a definition into header keywords and sections.

    Raises ValueError naming the line when there is no ``Bootstrap:`` header or a section
    name is unknown.
    """
    header: dict[str, str] = {}
    sections: list[Section] = []
    current: tuple[str, str] | None = None
    body: list[str] = []
    for n, line in enumerate(text.splitlines(), 1):
        m = _SECTION.match(line)
        if m:
            if m.group(1) not in KNOWN_SECTIONS:
                raise ValueError("line %d: unknown section %%%s (known: %s)"
                                 % (n, m.group(1), ", ".join(sorted(KNOWN_SECTIONS))))
            if current:
                sections.append(Section(current[0], current[1], "\n".join(body)))
            current, body = (m.group(1), m.group(2).strip()), []
            continue
        if current:
            body.append(line)
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        h = _HEADER.match(stripped)
        if not h:
            raise ValueError("line %d: expected 'Keyword: value' in the header, got %r"
                             % (n, stripped))
        header.setdefault(h.group(1).lower(), h.group(2).strip())
    if current:
        sections.append(Section(current[0], current[1], "\n".join(body)))
    if "bootstrap" not in header:
        raise ValueError("no 'Bootstrap:' header (e.g. 'Bootstrap: debootstrap')")
    return Definition(header, tuple(sections))

"""The READMEs' commands, run as written: every ```sh block of README.md and of
examples/*/README.md, in order, in one bash per file (so `export` and variables carry from block
to block, as in a user's terminal), as root in the checkout on the provisioned dev machine, the
way a new user types them after `make run`.

Not run: the block with `make run`/`make test` (the suite runs inside them), and ```text blocks,
which the READMEs use for outlines with placeholders and for commands meant for other machines.
What the commands create as alice is new (a token, which is revoked afterwards, jobs, an image
tag under alice/); nothing of alice's is changed or deleted."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.portal, pytest.mark.slurm]

FILES = [REPO / "README.md", *sorted(REPO.glob("examples/*/README.md"))]
SETUP = re.compile(r"^\s*make (run|test)\b", re.M)


def sh_blocks(text: str) -> list[str]:
    """The ```sh blocks of a Markdown text, in order (```text and others are not commands)."""
    return [b for lang, b in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if lang in ("sh", "bash")]


def test_sh_blocks_are_found_and_other_blocks_are_not():
    text = "a\n```sh\necho 1\n```\n```text\necho 2\n```\n```\nraw\n```\n```bash\necho 3\n```\n"
    assert sh_blocks(text) == ["echo 1\n", "echo 3\n"]


def _alice_tokens() -> set[int]:
    out = subprocess.run(["aiportal", "token", "list", "--user", "alice", "--json"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return {t["id"] for t in json.loads(out) if not t["revoked"]}


def _wait_node_back(node: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], capture_output=True, text=True,
                               timeout=30).stdout
        if state and "drain" not in state:
            return
        time.sleep(2)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_readme_commands_work_as_written(path: Path):
    blocks = [b for b in sh_blocks(path.read_text()) if not SETUP.search(b)]
    if not blocks:
        pytest.skip("%s has no commands to run" % path.name)
    before = _alice_tokens()
    script = "set -euo pipefail\n" + "\n".join(blocks)
    env = dict(os.environ, PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", HOME="/root")
    for k in ("AIPORTAL_TOKEN", "AIPORTAL_URL", "AIPORTAL_CONFIG"):
        env.pop(k, None)
    try:
        res = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    finally:
        for token_id in _alice_tokens() - before:
            subprocess.run(["aiportal", "token", "revoke", "--user", "alice", str(token_id)], capture_output=True,
                           timeout=60)
        if "fail-node" in script:
            _wait_node_back("g1n2")
    assert res.returncode == 0, "%s: the commands failed (exit %d)\n--- script\n%s\n--- stdout\n%s\n--- stderr\n%s" % (
        path.name, res.returncode, script, res.stdout[-6000:], res.stderr[-6000:])
    if path.name == "README.md" and path.parent == REPO:
        assert "hello from a GPU node" in res.stdout + res.stderr
        assert "hello from my own image" in res.stdout + res.stderr
    if path.parent.name == "cifar10":       # the served model's answer to curl -T 0-ship.png
        labels = "airplane|automobile|bird|cat|deer|dog|frog|horse|ship|truck"
        assert re.search(r'^"?(%s)"?$|"(%s)"' % (labels, labels), res.stdout, re.M), res.stdout[-3000:]

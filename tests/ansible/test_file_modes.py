"""What the portal host keeps on disk is its owners' alone: no file under the portal's state, log,
run, configuration, cache and shared folders can be read or written by another local account
(any user, any job), but for the exceptions below, each with its reason. Checked on the dev host
as provisioning and the running daemons left it.

A file counts as open to others when every folder above it lets others through (o+x) and the
file itself lets them read or write it: a 0700 folder (a user's folder, the secrets, the S3
store) closes everything inside it, whatever the modes in there."""
from __future__ import annotations

import fnmatch
import os
import stat
from pathlib import Path

import pytest
import yaml

from portal import db as dbmod
from portal.settings import Settings
from tests.conftest import REPO

pytestmark = [pytest.mark.portal]

COMMON_DEFAULTS = REPO / "ansible" / "roles" / "common" / "defaults" / "main.yml"
#: the portal's folders, named as the roles name them (ansible/roles/common/defaults/main.yml)
FOLDER_VARS = ("aiportal_etc_dir", "aiportal_state_dir", "aiportal_log_dir", "aiportal_run_dir",
               "aiportal_cache_dir")

#: files others may read, each with why: patterns over absolute paths ({name} from the folders)
EXCEPTIONS = [
    ("{state}/fakegpu/*/nvidia*", "the dev cluster's emulated GPU device nodes: jobs open them as their "
     "users, as they open /dev/nvidia* (0666) on a real node"),
    ("{state}/{builder}/.bashrc", "the image builder account's home, copied from /etc/skel"),
    ("{state}/{builder}/.profile", "the image builder account's home, copied from /etc/skel"),
    ("{state}/{builder}/.bash_logout", "the image builder account's home, copied from /etc/skel"),
    ("{health}/probe.sif", "the health check's probe image: an empty container that runs /bin/true"),
    ("{run}/*.pid", "a daemon's process id: anyone sees it in /proc"),
    ("{etc}/site.toml", "the site's public settings: `aiportal` in jobs reads them as the job's user "
     "(secrets only ever in portal.toml, 0600)"),
    ("{etc}/site-images.catalogue.json", "the list of base images to build and publish: public"),
    ("{etc}/nginx.conf", "configuration without secrets, as in the repository's template"),
    ("{etc}/ssh/sshd_config", "configuration without secrets, as in the repository's template"),
    ("{etc}/ssh/*.pub", "public keys"),
    ("{etc}/ssh/known_hosts", "public host keys"),
    ("{cache}/apptainer/*", "the Apptainer packages provisioning fetched and built (public software)"),
    ("{shared}/images/site-images.json", "the published base images (tags, digests): every user's jobs read it"),
    ("{shared}/images/base/*.sif", "the site's base images: every user's jobs run them"),
    ("{image_cache}/sha256/*", "the SIF cache: jobs open image.sif by digest as their users (the folder is "
     "0711: nobody lists it)"),
    ("{image_cache}/refs/*.json", "the SIF cache's index: a job's lookup reads the record of a reference it "
     "names, by that reference's hash (the folder is 0711: nobody lists it)"),
]


def _folders() -> dict[str, Path]:
    defaults = yaml.safe_load(COMMON_DEFAULTS.read_text())
    settings = Settings.load(require_secrets=False)
    folders = {name[len("aiportal_"):-len("_dir")]: Path(defaults[name]) for name in FOLDER_VARS}
    folders.update(shared=Path(settings.shared_root), image_cache=Path(settings.image_cache),
                   health=Path(settings.health.state_dir))
    return folders


def _others_reach(path: Path) -> bool:
    """Every folder from / down to ``path`` lets others through."""
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in [*reversed(path.parents), path])


def _open_to_others(top: Path):
    """(path, mode) of every file under ``top`` that another account can read or write, and of
    every folder there it can write into (not sticky); folders others cannot pass are not entered."""
    if not top.is_dir() or not _others_reach(top):
        return
    for root, dirs, files in os.walk(top):
        for name in list(dirs):
            st = os.lstat(os.path.join(root, name))
            if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
                yield os.path.join(root, name), stat.S_IMODE(st.st_mode)
            if not st.st_mode & stat.S_IXOTH:
                dirs.remove(name)
        for name in files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue            # its target is checked where it lies
            if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
                yield path, stat.S_IMODE(st.st_mode)


def _exception(path: str, names: dict[str, str]) -> str | None:
    """Why ``path`` may be open to others (its row in EXCEPTIONS), or None."""
    for pattern, reason in EXCEPTIONS:
        if fnmatch.fnmatchcase(path, pattern.format(**names)):
            return reason
    return None


def test_no_file_of_the_portal_is_open_to_other_accounts():
    folders = _folders()
    names = {k: str(v) for k, v in folders.items()}
    names["builder"] = Settings.load(require_secrets=False).image_builder_user
    tops = sorted({*folders.values()})
    assert any(t.is_dir() for t in tops), "none of %s exists: provision the dev host first" % tops
    offenders = ["%04o %s" % (mode, path) for top in tops for path, mode in _open_to_others(top)
                 if _exception(path, names) is None]
    assert not offenders, "open to every local account (narrow the mode where the file is made, or add " \
        "an exception with its reason):\n" + "\n".join(sorted(set(offenders)))


def test_the_database_and_its_journal_are_the_portals_alone():
    settings = Settings.load(require_secrets=False)
    assert settings.database_url.startswith("sqlite:///"), settings.database_url
    db = Path(settings.database_url[len("sqlite:///"):])
    files = [p for p in (db, *(db.with_name(db.name + s) for s in dbmod.JOURNAL_SUFFIXES)) if p.exists()]
    assert db in files
    assert {str(p): "%04o" % stat.S_IMODE(p.stat().st_mode) for p in files} == \
        {str(p): "%04o" % dbmod.DB_FILE_MODE for p in files}


def test_logs_are_read_by_their_owner_and_group_only():
    log_dir = _folders()["log"]
    logs = [p for p in log_dir.iterdir() if p.is_file()]
    assert logs, "no log in %s: is the portal running?" % log_dir
    too_open = {str(p): "%04o" % stat.S_IMODE(p.stat().st_mode) for p in logs if p.stat().st_mode & 0o137}
    assert not too_open, "logs beyond 0640: %s" % too_open

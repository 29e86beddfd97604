#!/bin/bash
# bootstrap.sh - make this Debian 12/13 machine able to run the project's Ansible and tests:
# Debian's python3 with venv, then ./.venv with aiportal (editable) and its dev extras.
# `bootstrap.sh --test-tools` installs only what the tests need besides: chromium, chromium-driver
# and postgresql (Debian packages; no daemon is started: tests start their own).
# Idempotent and fast when done: the venv is rebuilt only when pyproject.toml changes.
# Installs from Debian's mirror and PyPI only.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[bootstrap %(%T)T] %s\n' -1 "$*"; }

[ "$(id -u)" = 0 ] || { echo "bootstrap.sh: run as root (it installs Debian packages)" >&2; exit 1; }
[ -r /etc/debian_version ] || { echo "bootstrap.sh: this is not Debian; the dev cluster is provisioned for Debian 12/13" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
# No init system here (CI VMs, containers): keep package scripts from starting daemons; the
# Ansible roles start them with pid files. The common role installs the same file.
if [ ! -d /run/systemd/system ] && [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\n# Installed by aiportal: daemons are started by its Ansible roles.\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 0755 /usr/sbin/policy-rc.d
fi

packages=(python3 python3-venv python3-dev gcc make git curl ca-certificates)
# --test-tools: what only the test suite needs (make test): the headless Chromium and its
# WebDriver the browser test drives, and a PostgreSQL server for the PostgreSQL test
[ "${1:-}" = "--test-tools" ] && packages=(chromium chromium-driver postgresql)
need=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if ((${#need[@]})); then
  log "apt-get install ${need[*]}"
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[ "${1:-}" = "--test-tools" ] && { log "test tools: $(/usr/bin/chromium --version 2>/dev/null | head -1), $(ls -d /usr/lib/postgresql/*/bin | head -1)"; exit 0; }

stamp=.venv/.aiportal-bootstrap
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && .venv/bin/python -c 'import portal, ansible' 2>/dev/null; then
  log "virtualenv up to date"
  exit 0
fi
log "creating .venv (Debian's python3: $(/usr/bin/python3 --version))"
[ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'
echo "$want" > "$stamp"
log "virtualenv ready: $(.venv/bin/pip list 2>/dev/null | grep -Ec '') packages"

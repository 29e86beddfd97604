#!/bin/bash
# install-apptainer.sh - install a working Apptainer on Debian 12 (bookworm) or 13 (trixie), as
# root. Run by the aiportal `apptainer` role; prints "changed: ..." for every change it makes
# (the role reports changed only then), nothing of that kind when all is in place.
#
# Apptainer is only packaged in Debian sid (1.4.x). Its binaries need glibc >= 2.38
# (only __isoc23_strtol/__isoc23_strtoul@GLIBC_2.38); bookworm has 2.36.
#   * glibc >= 2.38 (Debian 13+): install sid's apptainer .deb unchanged; apt pulls deps from the host suite.
#   * glibc <  2.38 (Debian 12):  repack sid's .deb: ship trixie's libc6 privately under
#     /usr/lib/x86_64-linux-gnu/apptainer/glibc, point apptainer + starter at it with patchelf
#     (PT_INTERP + DT_RPATH), rebuild offsetpreload.so (LD_PRELOADed into host fuse2fs) against
#     the host libc, drop "libc6 (>= 2.38)" from Depends, then `apt-get install ./repacked.deb`.
# The host's libc and apt sources are never touched: sid/trixie are only read through a
# private apt configuration under $WORK, for downloads.
#
# Idempotent: exits early when the wanted version is installed and works. FORCE=1 reinstalls.
# Env: APPTAINER_VERSION (e.g. 1.4.5-2; default: whatever sid has), WORK (default
#      /var/cache/apptainer-install), DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

WORK=${WORK:-/var/cache/aiportal/apptainer}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WANT=${APPTAINER_VERSION:-}
PRIV=/usr/lib/x86_64-linux-gnu/apptainer/glibc
export DEBIAN_FRONTEND=noninteractive
log() { printf '[install-apptainer %(%T)T] %s\n' -1 "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
[ "$(dpkg --print-architecture)" = amd64 ] || { echo "only amd64 is handled" >&2; exit 1; }

# Post-install configuration (safe to repeat).
configure() {
  # Unprivileged FUSE (squashfuse_ll mounts SIFs for non-root users) needs a world-usable /dev/fuse.
  # udev normally makes it 0666; without udev (minimal VMs, containers) it can be 0600 and then
  # every non-root `apptainer exec img.sif` fails ("fuse: failed to open /dev/fuse").
  if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
    chmod 0666 /dev/fuse && echo "changed: chmod 0666 /dev/fuse (no udev rule applied)"
  fi
  # No systemd as PID 1 (CI VMs, containers): use cgroupfs directly; silences "Instance stats will
  # not be available" and makes `apptainer instance stats` work.
  if [ ! -d /run/systemd/system ] && grep -q '^systemd cgroups = yes' /etc/apptainer/apptainer.conf; then
    sed -i -E 's/^systemd cgroups = yes/systemd cgroups = no/' /etc/apptainer/apptainer.conf
    echo "changed: systemd cgroups = no"
  fi
  # Root runs with `root default capabilities = full`, i.e. it asks for all 41 capabilities and
  # aborts ("Requesting capability set ... while permitted capability set is ...") when this root
  # lacks some in its bounding set (sandboxed CI VMs). Then keep exactly the bounding set instead.
  local names=(CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP
    LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE
    SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME
    SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG
    WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE)
  local bnd have=() missing=() i
  bnd=$((16#$(awk '/^CapBnd/{print $2}' /proc/self/status)))
  for i in "${!names[@]}"; do
    if (( (bnd >> i) & 1 )); then have+=("CAP_${names[i]}"); else missing+=("CAP_${names[i]}"); fi
  done
  if (( ${#missing[@]} )) && ! grep -q '^root default capabilities = file' /etc/apptainer/apptainer.conf; then
    log "root's bounding set lacks ${missing[*]}: root default capabilities = file (the bounding set)"
    apptainer capability add --user root "$(IFS=,; echo "${have[*]}")" >/dev/null 2>&1
    sed -i -E 's/^root default capabilities = .*/root default capabilities = file/' /etc/apptainer/apptainer.conf
    echo "changed: root default capabilities = file"
    log "NOTE: root builds with %post still need: export APPTAINER_DROP_CAPS=$(IFS=,; echo "${missing[*]}")"
  fi
}

installed=$(dpkg-query -W -f='${db:Status-Abbrev}${Version}' apptainer 2>/dev/null || true)
if [ -z "${FORCE:-}" ] && [ "${installed:0:2}" = "ii" ] && apptainer --version >/dev/null 2>&1 &&
   { [ -z "$WANT" ] || [[ "${installed:3}" == "$WANT" || "${installed:3}" == "$WANT~bookworm"* ]]; }; then
  log "already installed: apptainer ${installed:3} ($(apptainer --version))"
  configure
  exit 0
fi

# --- private apt configuration (never touches /etc/apt) ------------------------------------
mkdir -p "$WORK"/lists/partial "$WORK"/cache/archives/partial "$WORK"/debs
: > "$WORK"/status
cat > "$WORK"/sources.list <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR sid main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR sid main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main
EOF
APT_PRIV=(-o Dir::Etc::sourcelist="$WORK/sources.list" -o Dir::Etc::sourceparts=/nonexistent
          -o Dir::State::Lists="$WORK/lists" -o Dir::Cache="$WORK/cache"
          -o Dir::State::status="$WORK/status" -o APT::Sandbox::User=root
          -o Acquire::Retries=3 -o Acquire::Languages=none
          # snapshot mirrors serve sid Release files past their Valid-Until date; signatures
          # are still checked
          -o Acquire::Check-Valid-Until=false)
# the bookworm keyring package already carries the trixie (and sid-signing) keys
[ -s /usr/share/keyrings/debian-archive-keyring.gpg ] || apt-get install -y -q debian-archive-keyring >/dev/null

log "apt-get update (private: sid + trixie)"
apt-get "${APT_PRIV[@]}" -q update >/dev/null
cand=$(apt-cache "${APT_PRIV[@]}" policy apptainer | awk '/Candidate:/{print $2}')
ver=${WANT:-$cand}
[ -n "$ver" ] && [ "$ver" != "(none)" ] || { echo "apptainer not found in sid" >&2; exit 1; }
upver=${ver%-*}; upver=${upver#*:}

cd "$WORK"/debs
rm -f apptainer_*.deb
log "download apptainer $ver from sid"
apt-get "${APT_PRIV[@]}" -q download "apptainer=$ver" >/dev/null
deb=$(ls apptainer_*_amd64.deb)

glibc=$(dpkg-query -W -f='${Version}' libc6 | sed -E 's/^([0-9]+\.[0-9]+).*/\1/')
need=$(dpkg-deb -f "$deb" Depends | grep -oE 'libc6 \(>= [0-9.]+\)' | grep -oE '[0-9]+\.[0-9]+' || echo 0)
log "host glibc $glibc, $deb needs glibc >= $need"

# runtime helpers for unprivileged use: squashfuse (mount SIF without extracting), fuse2fs,
# fuse-overlayfs (writable overlays); all are in bookworm and trixie.
EXTRA=(squashfuse fuse2fs fuse-overlayfs squashfs-tools uidmap)

if dpkg --compare-versions "$glibc" ge "$need"; then
  log "host glibc is new enough: installing sid's .deb unchanged"
  apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold "./$deb" "${EXTRA[@]}" e2fsprogs >/dev/null
else
  # private glibc: trixie's (stable, security-maintained) if new enough, else sid's
  libsuite=trixie
  tver=$(apt-cache "${APT_PRIV[@]}" madison libc6 | awk -F' *[|] *' '$3 ~ / trixie\// && !v {v=$2} END {print v}')
  dpkg --compare-versions "${tver:-0}" ge "$need" || libsuite=sid
  log "host glibc too old: repacking with a private glibc from $libsuite"
  command -v patchelf >/dev/null || apt-get install -y -q --no-install-recommends patchelf >/dev/null
  rm -f libc6_*.deb
  apt-get "${APT_PRIV[@]}" -q download "libc6/$libsuite" >/dev/null
  rm -rf pkg libc && mkdir -p libc
  dpkg-deb -R "$deb" pkg
  dpkg-deb -x libc6_*.deb libc
  mkdir -p "pkg$PRIV"
  cp -a libc/usr/lib/x86_64-linux-gnu/. "pkg$PRIV/"
  cp libc/usr/share/doc/libc6/copyright "pkg$PRIV/COPYRIGHT.libc6"
  libcver=$(dpkg-deb -f libc6_*.deb Version)
  for b in usr/bin/apptainer usr/lib/x86_64-linux-gnu/apptainer/bin/starter; do
    # DT_RPATH (not RUNPATH) so that libseccomp/libsqlite3's own libm/libc also come from $PRIV
    patchelf --set-interpreter "$PRIV/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$PRIV" "pkg/$b"
  done
  # smoke test before packaging, through the staged loader: every symbol version must resolve
  for b in usr/bin/apptainer usr/lib/x86_64-linux-gnu/apptainer/bin/starter; do
    if "pkg$PRIV/ld-linux-x86-64.so.2" --library-path "pkg$PRIV" --list "pkg/$b" 2>&1 | grep -E 'not found'; then
      echo "$b does not link against the private glibc $libcver" >&2; exit 1
    fi
  done
  "pkg$PRIV/ld-linux-x86-64.so.2" --library-path "pkg$PRIV" pkg/usr/bin/apptainer --version >/dev/null
  # offsetpreload.so is LD_PRELOADed into the host's fuse2fs, so it must use the host libc.
  if command -v cc >/dev/null; then
    # exact upstream source, from Debian's source package (5 MB orig tarball)
    rm -rf srcpkg && mkdir srcpkg
    ( cd srcpkg && apt-get "${APT_PRIV[@]}" -q source --download-only "apptainer=$ver" >/dev/null )
    tar -xzf srcpkg/apptainer_"$upver".orig.tar.gz -O --wildcards '*/tools/offsetpreload.c' > offsetpreload.c
    cc -O2 -shared -fPIC -o pkg/usr/lib/x86_64-linux-gnu/apptainer/lib/offsetpreload.so offsetpreload.c -ldl
  else
    log "WARNING: no C compiler; offsetpreload.so keeps needing glibc $need (only ext3 overlays embedded in a SIF, used by non-root, are affected)"
  fi
  newver="$ver~bookworm+glibc${libcver%%-*}"
  sed -i -E \
    -e "s/^Version: .*/Version: $newver/" \
    -e 's/libc6 \(>= [0-9.]+\)/libc6/' \
    -e '/^(Built-Using|Static-Built-Using):/d' \
    -e 's/^Recommends: .*/Recommends: e2fsprogs, squashfuse, fuse2fs, fuse-overlayfs/' \
    pkg/DEBIAN/control
  ( cd pkg && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum > DEBIAN/md5sums )
  rm -f apptainer-repacked.deb
  dpkg-deb --root-owner-group -Zgzip -z1 -b pkg apptainer-repacked.deb >/dev/null
  apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold ./apptainer-repacked.deb "${EXTRA[@]}" e2fsprogs >/dev/null
  rm -rf pkg libc srcpkg
fi

configure
apptainer --version
echo "changed: installed apptainer $(dpkg-query -W -f='${Version}' apptainer)"
log "done: apptainer $(dpkg-query -W -f='${Version}' apptainer)"

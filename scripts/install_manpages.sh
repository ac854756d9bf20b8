#!/usr/bin/env bash
# Install what `moe-lpr demo` reads: the Debian man-page packages of its six languages and mandoc,
# the renderer (man-db + groff also work, more slowly). Safe to rerun.
#   usage: bash scripts/install_manpages.sh          (as root, or with sudo available)
set -euo pipefail

PACKAGES=(manpages manpages-es manpages-zh manpages-tr manpages-hu manpages-uk mandoc)

die() { echo "install_manpages: $*" >&2; exit 1; }

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

# Some slim images (Docker "minimized" Debian/Ubuntu) drop /usr/share/man at install time.
for f in /etc/dpkg/dpkg.cfg.d/*; do
    [ -f "$f" ] && grep -qs '^path-exclude.*/usr/share/man' "$f" \
        && die "$f excludes /usr/share/man from installs; remove that line (or run 'unminimize') and rerun"
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "install_manpages: all packages already installed: ${PACKAGES[*]}"
    exit 0
fi

command -v apt-get >/dev/null || die "apt-get not found; install these Debian packages by other means: ${missing[*]}"
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "not root and no sudo; run as root: apt-get install ${missing[*]}"
    SUDO=(sudo)
fi

export DEBIAN_FRONTEND=noninteractive
echo "install_manpages: installing ${missing[*]}"
if ! ${SUDO[@]+"${SUDO[@]}"} apt-get install -y --no-install-recommends "${missing[@]}"; then
    ${SUDO[@]+"${SUDO[@]}"} apt-get update || die "apt-get update failed (no network or apt sources?)"
    ${SUDO[@]+"${SUDO[@]}"} apt-get install -y --no-install-recommends "${missing[@]}" \
        || die "could not install ${missing[*]} (all are in Debian 12 'bookworm' main)"
fi

for lang_dir in es zh_CN tr hu uk; do
    ls /usr/share/man/"$lang_dir"/man1 >/dev/null 2>&1 || die "/usr/share/man/$lang_dir is empty after install"
done
echo "install_manpages: done"

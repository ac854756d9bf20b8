#!/usr/bin/env bash
# Install what `moe-lpr demo` reads. Safe to rerun; nothing is downloaded again once in place.
#  - the LibreOffice help in en-US, es, zh-CN, el, hu, tr (the default corpus): the Debian packages
#    libreoffice-help-* fetched with `apt-get download` and unpacked with `dpkg-deb -x` into a cache directory,
#    $MOELPR_LIBREOFFICE_HELP or else ${XDG_CACHE_HOME:-~/.cache}/moelpr/libreoffice-help (LibreOffice itself
#    is not installed: the packages depend on it);
#  - the man-page packages of `--corpus manpages` and mandoc, their renderer, installed with apt-get.
#   usage: bash scripts/install_corpora.sh     (as root, or as the user who runs the demo with sudo available)
set -euo pipefail

MAN_PACKAGES=(manpages manpages-es manpages-zh manpages-tr manpages-hu manpages-uk mandoc)
HELP_PACKAGES=(libreoffice-help-en-us libreoffice-help-es libreoffice-help-zh-cn libreoffice-help-el
    libreoffice-help-hu libreoffice-help-tr)
HELP_DIRS=(en-US es zh-CN el hu tr)
HELP_CACHE="${MOELPR_LIBREOFFICE_HELP:-${XDG_CACHE_HOME:-$HOME/.cache}/moelpr/libreoffice-help}"

die() { echo "install_corpora: $*" >&2; exit 1; }

command -v apt-get >/dev/null || die "apt-get not found; on a system without apt, install the man pages and mandoc \
yourself, unpack ${HELP_PACKAGES[*]} into $HELP_CACHE, or run the demo on your own text with --corpora"
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "not root and no sudo; run this script as root"
    SUDO=(sudo)
fi
as_root() { ${SUDO[@]+"${SUDO[@]}"} "$@"; }
export DEBIAN_FRONTEND=noninteractive
updated=0
apt_update() {
    [ "$updated" -eq 1 ] && return 0
    as_root apt-get update || die "apt-get update failed (no network or apt sources?)"
    updated=1
}

# ---- man pages -------------------------------------------------------------------------------------------------
missing=()
for pkg in "${MAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# Some slim images (Docker "minimized" Debian/Ubuntu) drop /usr/share/man at install time.
for f in /etc/dpkg/dpkg.cfg.d/*; do
    [ -f "$f" ] && grep -qs '^path-exclude.*/usr/share/man' "$f" \
        && die "$f excludes /usr/share/man from installs; remove that line (or run 'unminimize') and rerun"
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install_corpora: man pages already installed: ${MAN_PACKAGES[*]}"
else
    echo "install_corpora: installing ${missing[*]}"
    if ! as_root apt-get install -y --no-install-recommends "${missing[@]}"; then
        apt_update
        as_root apt-get install -y --no-install-recommends "${missing[@]}" \
            || die "could not install ${missing[*]} (all are in Debian 12 'bookworm' main)"
    fi
    for lang_dir in es zh_CN tr hu uk; do
        ls /usr/share/man/"$lang_dir"/man1 >/dev/null 2>&1 || die "/usr/share/man/$lang_dir is empty after install"
    done
fi

# ---- LibreOffice help ------------------------------------------------------------------------------------------
if [ -f "$HELP_CACHE/packages.txt" ] && [ "$(wc -l < "$HELP_CACHE/packages.txt")" -eq ${#HELP_PACKAGES[@]} ]; then
    echo "install_corpora: LibreOffice help already in $HELP_CACHE"
else
    command -v dpkg-deb >/dev/null || die "dpkg-deb not found; it unpacks the libreoffice-help packages"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    if [ "$(id -u)" -eq 0 ] && id _apt >/dev/null 2>&1; then
        chown _apt "$work"  # as root, apt downloads as its sandbox user, who must be able to write there
    fi
    echo "install_corpora: downloading ${HELP_PACKAGES[*]}"
    if ! (cd "$work" && apt-get download "${HELP_PACKAGES[@]}"); then
        apt_update
        (cd "$work" && apt-get download "${HELP_PACKAGES[@]}") \
            || die "could not download ${HELP_PACKAGES[*]} (Debian 12 'bookworm' main has them)"
    fi
    mkdir -p "$(dirname "$HELP_CACHE")"
    staged="$HELP_CACHE.partial.$$"
    rm -rf "$staged"
    mkdir -p "$staged"
    for deb in "$work"/*.deb; do
        dpkg-deb -x "$deb" "$work/root"
        dpkg-deb --show --showformat='${Package}=${Version}\n' "$deb" >> "$staged/packages.txt"
    done
    for dir in "${HELP_DIRS[@]}"; do
        [ -d "$work/root/usr/share/libreoffice/help/$dir/text" ] || die "the packages hold no help pages for $dir"
        mv "$work/root/usr/share/libreoffice/help/$dir" "$staged/$dir"
    done
    rm -rf "$HELP_CACHE"
    mv "$staged" "$HELP_CACHE"  # complete or absent: the demo never reads a half-unpacked tree
    echo "install_corpora: LibreOffice help unpacked into $HELP_CACHE"
fi
echo "install_corpora: done"

#!/usr/bin/env bash
# Fetch a newer QEMU than Debian 12 ships, for the outer VM of
# scripts/test-nested-kvm.sh (its default): qemu-system-x86 from Debian's bookworm-backports
# (QEMU 10 at the time of writing; Debian 12 itself has 7.2), unpacked with
# `dpkg -x` into the cache. Nothing is installed and the machine's apt
# configuration is left alone: apt reads a sources list and package lists of
# its own under the cache directory.
#
# Why: QEMU 7.2's TCG emulation of AMD SVM, which turns the outer VM into a
# hardware-style KVM host, ignores the XSETBV intercept (fixed in 8.2), and the
# outer VM's own kernel crashed or hung now and then while inner VMs ran (see
# BENCHMARKS.md, "SMP boots on the nested test bed"). A second, newer QEMU is
# how to tell the test bed's faults from minivmm's.
#
# Usage: scripts/fetch-qemu.sh [--refresh]
#
#   --refresh   ask the archive for its newest version, instead of reusing
#               the newest one already in the cache
#
# Outputs, in ${MINIVMM_CACHE:-~/.cache/minivmm}/qemu-backports/<version>/:
# the unpacked packages (qemu-system-x86, qemu-system-common and
# qemu-system-data). The last lines on stdout are `qemu=PATH` (the
# qemu-system-x86_64 binary) and `datadir=DIR` (its firmware and option ROMs,
# for -L; the BIOS itself comes from the installed seabios package, a second
# -L /usr/share/seabios). The binary uses the shared libraries of Debian 12's
# own qemu-system-x86, which must be installed (the script checks with ldd).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

refresh=false
while [ "$#" -gt 0 ]; do
    case "$1" in
        --refresh) refresh=true; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1'; usage: $0 [--refresh]" ;;
    esac
done

suite=bookworm-backports
packages=(qemu-system-x86 qemu-system-common qemu-system-data)
base="$(minivmm_cache_dir)/qemu-backports"
mkdir -p "$base"
lock_or_wait "$base.lock"

print_outputs() {
    echo "qemu=$1/usr/bin/qemu-system-x86_64"
    echo "datadir=$1/usr/share/qemu"
}

# apt, pointed at a sources list and lists of its own (so the system's apt
# state is neither read nor changed); as root, apt's download sandbox user
# cannot write into the cache, so downloads run as root.
apt_private() {
    local cmd="$1"
    shift
    local sandbox=()
    [ "$(id -u)" -ne 0 ] || sandbox=(-o APT::Sandbox::User=root)
    "$cmd" -q -o Dir::Etc::sourcelist="$base/sources.list" -o Dir::Etc::sourceparts=- \
        -o Dir::State::Lists="$base/lists" -o Dir::Cache="$base/apt-cache" \
        -o Debug::NoLocking=1 "${sandbox[@]}" "$@"
}

dir=""
if [ "$refresh" = false ]; then
    dir="$(find "$base" -mindepth 4 -maxdepth 4 -path '*/usr/bin/qemu-system-x86_64' 2>/dev/null |
        sed 's|/usr/bin/qemu-system-x86_64$||' | sort -V | tail -n 1)"
fi
if [ -z "$dir" ]; then
    echo "deb http://deb.debian.org/debian $suite main" >"$base/sources.list"
    mkdir -p "$base/lists/partial" "$base/apt-cache/archives/partial"
    log "reading $suite's package list"
    apt_private apt-get update </dev/null >&2 ||
        die "apt-get update of $suite failed; check the network (deb.debian.org must be reachable)"
    version="$(apt_private apt-cache policy qemu-system-x86 2>/dev/null |
        awk '$1 == "Candidate:" && $2 != "(none)" { print $2 }')"
    [ -n "$version" ] || die "$suite has no qemu-system-x86; use the system's QEMU (test-nested-kvm.sh --outer-qemu system)"
    dir="$base/${version//:/_}" # no colon: QEMU option values split on it
    tmp="$(mktemp -d "$base/.download.XXXXXX")"
    log "downloading ${packages[*]} $version from $suite"
    if ! (cd "$tmp" && apt_private apt-get download "${packages[@]/%/=$version}" </dev/null >&2); then
        rm -rf "$tmp"
        die "apt-get download of QEMU $version failed; check the network"
    fi
    for deb in "$tmp"/*.deb; do
        dpkg -x "$deb" "$tmp/root" || { rm -rf "$tmp"; die "dpkg -x $deb failed"; }
    done
    rm -rf "$dir"
    mv "$tmp/root" "$dir"
    rm -rf "$tmp"
    log "fetched QEMU $version into $dir"
fi

bin="$dir/usr/bin/qemu-system-x86_64"
missing="$(ldd "$bin" 2>/dev/null | awk '/not found/ { print $1 }' | tr '\n' ' ')"
[ -z "$missing" ] ||
    die "$bin needs shared libraries this machine lacks: $missing; install Debian's qemu-system-x86 (which brings them)"
"$bin" --version >/dev/null 2>&1 || die "$bin does not run; remove $dir and retry, or use --outer-qemu system"
print_outputs "$dir"

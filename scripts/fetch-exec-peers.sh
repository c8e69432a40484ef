#!/usr/bin/env bash
# Fetch the two QEMU-based tools `minivmm exec` is measured against, and what
# their guests need, into the cache (for scripts/nested/bench-exec-peers.sh):
#
#   vmtest 0.18.0     crates.io; `cargo install --locked` (its releases' static
#                     binary lives on GitHub, which this build does not assume)
#   virtiofsd 1.14.0  crates.io (the Rust one: Debian 12 has only QEMU's C
#                     daemon, whose flags virtme-ng does not speak, and without a
#                     virtiofsd virtme-ng falls back to 9p with no page cache)
#   virtme-ng 1.42    PyPI; `pip download` of its wheels and `pip install
#                     --target` with Debian's python3.11 (vng is Python: the
#                     outer VM gets that interpreter and its standard library)
#   qemu-guest-agent  Debian's, unpacked: vmtest runs commands through it
#   udev              Debian's, unpacked: virtme-ng's init finds its virtio
#                     serial ports by the names udev gives them
#
# Usage: scripts/fetch-exec-peers.sh
#
# Prints `vmtest=PATH`, `virtiofsd=PATH`, `vng_site=DIR` (the packages' directory, for
# PYTHONPATH), `qga=DIR` and `udev=DIR` (the unpacked packages). Cached under
# ${MINIVMM_CACHE:-~/.cache/minivmm}/exec-peers/; a second run returns at once.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"

vmtest_version=0.18.0
virtiofsd_version=1.14.0
vng_version=1.42
cache="$(minivmm_cache_dir)/exec-peers"
mkdir -p "$cache"
lock_or_wait "$cache.lock"

vmtest="$cache/vmtest-$vmtest_version/bin/vmtest"
if [ ! -x "$vmtest" ]; then
    command -v cargo >/dev/null || die "cargo is missing; install Rust (rustup) to build vmtest"
    log "building vmtest $vmtest_version with cargo install (a few minutes)"
    cargo install --locked vmtest --version "$vmtest_version" --root "$cache/vmtest-$vmtest_version" >&2 ||
        die "cargo install vmtest $vmtest_version failed; see cargo's messages above"
fi

virtiofsd="$cache/virtiofsd-$virtiofsd_version/bin/virtiofsd"
if [ ! -x "$virtiofsd" ]; then
    ensure_debs libseccomp-dev libcap-ng-dev
    log "building virtiofsd $virtiofsd_version with cargo install (a few minutes)"
    cargo install --locked virtiofsd --version "$virtiofsd_version" --root "$cache/virtiofsd-$virtiofsd_version" >&2 ||
        die "cargo install virtiofsd $virtiofsd_version failed; see cargo's messages above"
fi

site="$cache/virtme-ng-$vng_version"
if [ ! -r "$site/virtme_ng/run.py" ]; then
    ensure_debs python3.11 python3-pip
    log "downloading virtme-ng $vng_version and its dependencies from PyPI"
    tmp="$(mktemp -d "$cache/.vng.XXXXXX")"
    # python3.11 -m pip: one of the wheels (charset_normalizer) is built per
    # interpreter version, and the outer VM runs this same interpreter.
    if ! /usr/bin/python3.11 -m pip download -q --only-binary=:all: -d "$tmp/wheels" "virtme-ng==$vng_version" >&2 ||
        ! /usr/bin/python3.11 -m pip install -q --no-index --find-links "$tmp/wheels" --target "$tmp/site" "virtme-ng==$vng_version" >&2; then
        rm -rf "$tmp"
        die "pip could not fetch virtme-ng $vng_version; check the network"
    fi
    rm -rf "$site"
    mv "$tmp/site" "$site"
    rm -rf "$tmp"
fi
[ -x "$site/virtme/guest/bin/virtme-ng-init" ] ||
    die "$site has no virtme/guest/bin/virtme-ng-init; the virtme-ng wheel changed shape"

# A Debian package unpacked in the cache, one directory per version, holding FILE.
unpacked() { # package file
    local version dir
    apt_need_lists "$1"
    version="$(deb_candidate_version "$1")"
    dir="$cache/$1-${version//:/_}"
    [ -d "$dir" ] || deb_download_extract "$1" "$dir"
    [ -x "$dir/$2" ] || die "$1 $version has no $2; Debian's package layout changed"
    printf '%s\n' "$dir"
}
qga="$(unpacked qemu-guest-agent usr/sbin/qemu-ga)"
udev="$(unpacked udev bin/udevadm)"

echo "vmtest=$vmtest"
echo "virtiofsd=$virtiofsd"
echo "vng_site=$site"
echo "qga=$qga"
echo "udev=$udev"

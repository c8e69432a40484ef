# shellcheck shell=bash
# Shared helpers for minivmm's scripts. Source it; do not run it.
#
# Conventions: progress and errors go to stderr, results (key=path lines) to
# stdout, so a caller can do `eval "$(scripts/build-linux.sh)"` or grep the
# last lines.

# Print a progress line on stderr, prefixed with the script's name.
log() {
    printf '%s: %s\n' "${0##*/}" "$*" >&2
}

# Print an error on stderr and exit 1. Say what went wrong and how to fix it.
die() {
    printf '%s: error: %s\n' "${0##*/}" "$*" >&2
    exit 1
}

# The cache directory shared by every script: $MINIVMM_CACHE, else
# $XDG_CACHE_HOME/minivmm, else ~/.cache/minivmm. Created if missing.
minivmm_cache_dir() {
    local home="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
    local dir="${MINIVMM_CACHE:-${XDG_CACHE_HOME:-$home/.cache}/minivmm}"
    mkdir -p "$dir" || die "cannot create the cache directory $dir; set MINIVMM_CACHE to a writable directory"
    printf '%s\n' "$dir"
}

# Hash of stdin, hex sha256.
sha256_of_stdin() {
    sha256sum | cut -d' ' -f1
}

# Installed version of a Debian package, or nothing when it is not installed.
deb_installed_version() {
    dpkg-query -W -f='${db:Status-Status} ${Version}\n' "$1" 2>/dev/null |
        awk '$1 == "installed" { print $2 }'
}

# Candidate version of a Debian package in apt's lists, or nothing.
deb_candidate_version() {
    apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2 }'
}

_apt_updated=false
# Run `apt-get update` at most once per script run.
apt_update_once() {
    if [ "$_apt_updated" = false ]; then
        log "running apt-get update"
        apt-get update -q >&2 || die "apt-get update failed; check the network and /etc/apt/sources.list"
        _apt_updated=true
    fi
}

# Make sure each named package has a candidate in apt's lists, updating once
# if one has none.
apt_need_lists() {
    local pkg
    for pkg in "$@"; do
        if [ -z "$(deb_candidate_version "$pkg")" ]; then
            apt_update_once
            [ -n "$(deb_candidate_version "$pkg")" ] ||
                die "apt knows no package '$pkg'; this needs Debian 12 (bookworm) with its main archive in /etc/apt/sources.list"
        fi
    done
}

# Install the named Debian packages that are missing. Needs root when
# anything is missing; otherwise says which command to run.
ensure_debs() {
    local pkg missing=()
    for pkg in "$@"; do
        [ -n "$(deb_installed_version "$pkg")" ] || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        die "missing Debian packages: ${missing[*]}; install them with: sudo apt-get install --no-install-recommends ${missing[*]}"
    fi
    apt_need_lists "${missing[@]}"
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null >&2 ||
        die "apt-get install ${missing[*]} failed; see apt's messages above"
}

# Fetch a Debian package with `apt-get download` and unpack it with
# `dpkg -x` into DEST (which must not exist yet; it is created atomically).
# Works without root.
deb_download_extract() {
    local pkg="$1" dest="$2" tmp deb
    apt_need_lists "$pkg"
    tmp="$(mktemp -d "${dest%/*}/.download.XXXXXX")"
    log "downloading $pkg"
    # As root, apt's download sandbox user (_apt) cannot write into a private
    # directory such as ~/.cache: download as root instead.
    local sandbox=()
    [ "$(id -u)" -ne 0 ] || sandbox=(-o APT::Sandbox::User=root)
    if ! (cd "$tmp" && apt-get download -q "${sandbox[@]}" "$pkg" </dev/null >&2); then
        rm -rf "$tmp"
        die "apt-get download $pkg failed; check the network, or run apt-get update"
    fi
    deb="$(find "$tmp" -maxdepth 1 -name '*.deb' | head -n 1)"
    [ -n "$deb" ] || { rm -rf "$tmp"; die "apt-get download $pkg produced no .deb file"; }
    mkdir "$tmp/root"
    dpkg -x "$deb" "$tmp/root" || { rm -rf "$tmp"; die "dpkg -x $deb failed"; }
    rm -rf "$dest"
    mv "$tmp/root" "$dest"
    rm -rf "$tmp"
}

# Hold an exclusive lock on FILE for the rest of the script (on a new fd each
# call), so two runs that share the cache do not build the same thing at once.
lock_or_wait() {
    local file="$1" fd
    command -v flock >/dev/null || return 0
    exec {fd}>"$file"
    if ! flock -n "$fd"; then
        log "waiting for another run holding $file"
        flock "$fd"
    fi
}

# True when the ELF file has a PVH entry point: a Xen ELF note of type 18
# (XEN_ELFNOTE_PHYS32_ENTRY), which readelf shows as an unknown note type.
has_pvh_note() {
    local notes
    notes="$(readelf -n "$1" 2>/dev/null)" || return 1
    grep -qE '^ *Xen .*(note type: \(0x00000012\)|PHYS32_ENTRY)' <<<"$notes"
}

# The busybox-static version to use: the newest already in the cache CACHE
# (fast, offline), else the one apt would fetch.
busybox_version() { # cache
    local v
    v="$(find "$1" -maxdepth 3 -path "$1/busybox-static-*/bin/busybox" 2>/dev/null |
        sed -e "s|^$1/busybox-static-||" -e 's|/bin/busybox$||' | sort -V | tail -n 1)"
    if [ -z "$v" ]; then
        apt_need_lists busybox-static
        v="$(deb_candidate_version busybox-static)"
    fi
    printf '%s\n' "$v"
}

# Path of a static busybox of VERSION under CACHE, fetched from Debian's
# busybox-static package once per version.
fetch_busybox() { # cache version
    local dir="$1/busybox-static-$2"
    if [ ! -x "$dir/bin/busybox" ]; then
        lock_or_wait "$1/busybox.lock"
        [ -x "$dir/bin/busybox" ] || deb_download_extract busybox-static "$dir"
        [ -x "$dir/bin/busybox" ] || die "busybox-static $2 has no bin/busybox; Debian's package layout changed"
    fi
    printf '%s\n' "$dir/bin/busybox"
}

# Put BUSYBOX into ROOT/bin with one symlink per applet it lists.
install_busybox() { # busybox root
    mkdir -p "$2/bin"
    cp "$1" "$2/bin/busybox"
    "$1" --list | while IFS= read -r applet; do
        [ "$applet" = busybox ] || ln -sf busybox "$2/bin/$applet"
    done
}

# Write the newc cpio archive of the directory ROOT to stdout, owned by root,
# with /dev/console (char 5:1) first: the kernel opens it for /init's stdio.
# The device entry is written by hand so that no mknod (no root) is needed.
# newc format: "070701", 13 fields of 8 hex digits, the name, NUL, padding to 4.
initramfs_cpio() { # root
    _newc_entry dev $((0040755)) 0 0
    _newc_entry dev/console $((0020600)) 5 1
    _newc_entry 'TRAILER!!!' 0 0 0
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort |
        cpio --quiet -o -H newc -R 0:0 --reproducible) ||
        die "cpio failed to write the archive of $1; see the messages above"
}

_newc_entry() { # name mode rdevmajor rdevminor
    local name="$1" mode="$2" major="$3" minor="$4" namesize hdr pad
    namesize=$((${#name} + 1))
    hdr="$(printf '070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x' \
        0 "$mode" 0 0 1 0 0 0 0 "$major" "$minor" "$namesize" 0)"
    pad=$(((4 - (110 + namesize) % 4) % 4))
    printf '%s%s\0' "$hdr" "$name"
    head -c "$pad" /dev/zero
}

# Build (or take from the cache) every Linux guest the tests boot and export
# the variables the tests find them by. Run from the repository's top.
export_linux_guests() {
    local out
    out=$(scripts/build-linux.sh --variant mpparse)
    MINIVMM_LINUX_VMLINUX="$(sed -n 's/^vmlinux=//p' <<<"$out")"
    MINIVMM_LINUX_BZIMAGE="$(sed -n 's/^bzImage=//p' <<<"$out")"
    out=$(scripts/build-initramfs.sh --cmd 'cat /proc/cpuinfo | grep -c ^processor')
    MINIVMM_INITRAMFS="$(sed -n 's/^initramfs=//p' <<<"$out")"
    # Built like Debian's kernels: ACPI on, MP-table parser off (CPUs from the MADT).
    out=$(scripts/build-linux.sh --variant acpi)
    MINIVMM_LINUX_ACPI_VMLINUX="$(sed -n 's/^vmlinux=//p' <<<"$out")"
    out=$(scripts/build-initramfs.sh --poweroff --cmd 'cat /proc/cpuinfo | grep -c ^processor')
    MINIVMM_INITRAMFS_POWEROFF="$(sed -n 's/^initramfs=//p' <<<"$out")"
    # For tests/linux_virtio.rs: /init runs the script the test puts on /dev/vda.
    out=$(scripts/build-initramfs.sh --cmd "tr -d '\\000' </dev/vda >/tmp/disk.sh && sh /tmp/disk.sh")
    MINIVMM_INITRAMFS_DISK_SCRIPT="$(sed -n 's/^initramfs=//p' <<<"$out")"
    # Debian's own cloud kernel (apt-get download + dpkg -x), and its extracted ELF.
    out=$(scripts/fetch-debian-kernel.sh)
    MINIVMM_DEBIAN_VMLINUZ="$(sed -n 's/^vmlinuz=//p' <<<"$out")"
    MINIVMM_DEBIAN_VMLINUX="$(sed -n 's/^vmlinux=//p' <<<"$out")"
    MINIVMM_DEBIAN_MODULES="$(sed -n 's/^modules=//p' <<<"$out")"
    # The same disk-script initramfs for Debian's kernel, with its virtio modules.
    local insmods=() m
    while read -r m; do
        insmods+=(--insmod "$MINIVMM_DEBIAN_MODULES/$m")
    done <"$MINIVMM_DEBIAN_MODULES/virtio.order"
    out=$(scripts/build-initramfs.sh "${insmods[@]}" \
        --cmd "tr -d '\\000' </dev/vda >/tmp/disk.sh && sh /tmp/disk.sh")
    MINIVMM_INITRAMFS_DISK_SCRIPT_DEBIAN="$(sed -n 's/^initramfs=//p' <<<"$out")"
    export MINIVMM_LINUX_VMLINUX MINIVMM_LINUX_BZIMAGE MINIVMM_INITRAMFS \
        MINIVMM_LINUX_ACPI_VMLINUX MINIVMM_INITRAMFS_POWEROFF MINIVMM_INITRAMFS_DISK_SCRIPT \
        MINIVMM_DEBIAN_VMLINUZ MINIVMM_DEBIAN_VMLINUX MINIVMM_DEBIAN_MODULES \
        MINIVMM_INITRAMFS_DISK_SCRIPT_DEBIAN
}

#!/usr/bin/env bash
# Build a busybox initramfs for minivmm's Linux guests.
#
# Usage: scripts/build-initramfs.sh [--cmd 'shell command'] [--poweroff]
#
#   --cmd CMD    run CMD (with /bin/sh) after the marker lines, then end the
#                VM; without --cmd, /init starts an interactive shell on
#                ttyS0 and ends the VM when that shell exits
#   --poweroff   end with `poweroff -f` instead of `reboot -f` (for kernels
#                with ACPI, to test the FADT power-off path)
#
# /init mounts proc, sys, dev and /tmp, then prints on the console:
#   minivmm-init: reached /init
#   minivmm-init: nproc=N
#   minivmm-init: memtotal_kb=N
#   minivmm-init: exit-status=N       (after --cmd; N is its exit status)
#   minivmm-init: reboot -f           (or: poweroff -f)
#
# busybox comes from Debian's busybox-static package (apt-get download +
# dpkg -x; no root needed once apt's lists are there). The archive is a gzip'd
# newc cpio, cached in ${MINIVMM_CACHE:-${XDG_CACHE_HOME:-~/.cache}/minivmm}/initramfs/
# and keyed on busybox's version, /init and the command. The last line on
# stdout is `initramfs=PATH`; progress goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"

# Bump when the archive's layout changes.
recipe=1

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

cmd=""
end_action="reboot -f"
while [ "$#" -gt 0 ]; do
    case "$1" in
        --cmd) [ "$#" -ge 2 ] || die "--cmd needs a shell command, e.g. --cmd 'cat /proc/cpuinfo'"; cmd="$2"; shift 2 ;;
        --cmd=*) cmd="${1#--cmd=}"; shift ;;
        --poweroff) end_action="poweroff -f"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1'; usage: $0 [--cmd 'shell command'] [--poweroff]" ;;
    esac
done

cache="$(minivmm_cache_dir)"

# The /init script. $end_action is substituted now; everything else runs in
# the guest.
init_script() {
    cat <<EOF
#!/bin/sh
# /init of minivmm's test initramfs, made by scripts/build-initramfs.sh.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=linux
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t tmpfs tmpfs /tmp
echo "minivmm-init: reached /init"
echo "minivmm-init: nproc=\$(nproc)"
echo "minivmm-init: memtotal_kb=\$(awk '/^MemTotal:/ { print \$2 }' /proc/meminfo)"
if [ -s /etc/minivmm-cmd ]; then
    sh /etc/minivmm-cmd
    echo "minivmm-init: exit-status=\$?"
else
    echo "minivmm-init: no command given; starting a shell on ttyS0 (exit it to end the VM)"
    setsid sh -c 'exec sh -i </dev/ttyS0 >/dev/ttyS0 2>&1'
fi
echo "minivmm-init: $end_action"
sync
$end_action
sleep 1
echo "minivmm-init: $end_action did not end the VM"
EOF
}

ensure_debs cpio gzip
# busybox's version: the newest already in the cache (fast, offline), else
# the one apt would fetch.
bb_version="$(find "$cache" -maxdepth 3 -path "$cache/busybox-static-*/bin/busybox" 2>/dev/null |
    sed -e "s|^$cache/busybox-static-||" -e 's|/bin/busybox$||' | sort -V | tail -n 1)"
if [ -z "$bb_version" ]; then
    apt_need_lists busybox-static
    bb_version="$(deb_candidate_version busybox-static)"
fi

key="$({
    echo "recipe=$recipe busybox=$bb_version"
    init_script
    printf 'cmd=%s\n' "$cmd"
} | sha256_of_stdin)"
out="$cache/initramfs/initramfs-${key:0:16}.cpio.gz"
if [ -s "$out" ]; then
    log "up to date: $out"
    echo "initramfs=$out"
    exit 0
fi
mkdir -p "$cache/initramfs"
lock_or_wait "$cache/initramfs.lock"

# busybox-static, fetched once per version.
bb_dir="$cache/busybox-static-$bb_version"
busybox="$bb_dir/bin/busybox"
if [ ! -x "$busybox" ]; then
    deb_download_extract busybox-static "$bb_dir"
    [ -x "$busybox" ] || die "busybox-static $bb_version has no bin/busybox; Debian's package layout changed"
fi

stage="$(mktemp -d "$cache/initramfs/.stage.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,run}
cp "$busybox" "$root/bin/busybox"
# One symlink per applet, from the list busybox itself gives.
"$busybox" --list | while IFS= read -r applet; do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
init_script >"$root/init"
chmod 0755 "$root/init"
if [ -n "$cmd" ]; then
    printf '%s\n' "$cmd" >"$root/etc/minivmm-cmd"
fi
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"

# A first cpio archive with /dev/console (char 5:1), written by hand so that
# no root is needed for mknod: the kernel opens it for /init's stdio. newc
# format: "070701", 13 fields of 8 hex digits, the name, NUL, padding to 4.
newc_entry() { # name mode rdevmajor rdevminor
    local name="$1" mode="$2" major="$3" minor="$4" namesize hdr pad
    namesize=$((${#name} + 1))
    hdr="$(printf '070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x' \
        0 "$mode" 0 0 1 0 0 0 0 "$major" "$minor" "$namesize" 0)"
    pad=$(((4 - (110 + namesize) % 4) % 4))
    printf '%s%s\0' "$hdr" "$name"
    head -c "$pad" /dev/zero
}
{
    newc_entry dev $((0040755)) 0 0
    newc_entry dev/console $((0020600)) 5 1
    newc_entry 'TRAILER!!!' 0 0 0
} >"$stage/console.cpio"

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible) >"$stage/root.cpio" ||
    die "cpio failed to write the archive; see the messages above"
cat "$stage/console.cpio" "$stage/root.cpio" | gzip -n -9 >"$stage/initramfs.cpio.gz"
mv "$stage/initramfs.cpio.gz" "$out"
log "built $out ($(du -k "$out" | cut -f1) KiB, busybox $bb_version)"
echo "initramfs=$out"

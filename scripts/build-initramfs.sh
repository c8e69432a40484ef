#!/usr/bin/env bash
# Build a busybox initramfs for minivmm's Linux guests.
#
# Usage: scripts/build-initramfs.sh [--cmd 'shell command'] [--poweroff]
#                                   [--insmod MODULE.ko]...
#
#   --cmd CMD    run CMD (with /bin/sh) after the marker lines, then end the
#                VM; without --cmd, /init starts an interactive shell on
#                ttyS0 and ends the VM when that shell exits
#   --poweroff   end with `poweroff -f` instead of `reboot -f` (for kernels
#                with ACPI, to test the FADT power-off path)
#   --insmod KO  load this kernel module before the command (repeatable, in
#                the order given; uncompressed .ko of the kernel that boots)
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
modules=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --cmd) [ "$#" -ge 2 ] || die "--cmd needs a shell command, e.g. --cmd 'cat /proc/cpuinfo'"; cmd="$2"; shift 2 ;;
        --cmd=*) cmd="${1#--cmd=}"; shift ;;
        --poweroff) end_action="poweroff -f"; shift ;;
        --insmod) [ -r "${2:-}" ] || die "--insmod needs a readable .ko file"; modules+=("$2"); shift 2 ;;
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
for m in \$(cat /etc/minivmm-modules 2>/dev/null); do
    insmod /lib/minivmm-modules/\$m || echo "minivmm-init: insmod \$m failed"
done
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
bb_version="$(busybox_version "$cache")"

key="$({
    echo "recipe=$recipe busybox=$bb_version"
    init_script
    printf 'cmd=%s\n' "$cmd"
    for m in "${modules[@]}"; do sha256sum <"$m"; done
} | sha256_of_stdin)"
out="$cache/initramfs/initramfs-${key:0:16}.cpio.gz"
if [ -s "$out" ]; then
    log "up to date: $out"
    echo "initramfs=$out"
    exit 0
fi
mkdir -p "$cache/initramfs"
lock_or_wait "$cache/initramfs.lock"

busybox="$(fetch_busybox "$cache" "$bb_version")"

stage="$(mktemp -d "$cache/initramfs/.stage.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
root="$stage/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,run}
install_busybox "$busybox" "$root"
init_script >"$root/init"
chmod 0755 "$root/init"
if [ -n "$cmd" ]; then
    printf '%s\n' "$cmd" >"$root/etc/minivmm-cmd"
fi
if [ "${#modules[@]}" -gt 0 ]; then
    mkdir -p "$root/lib/minivmm-modules"
    for m in "${modules[@]}"; do
        cp "$m" "$root/lib/minivmm-modules/"
        basename "$m" >>"$root/etc/minivmm-modules"
    done
fi
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"

initramfs_cpio "$root" | gzip -n -9 >"$stage/initramfs.cpio.gz"
mv "$stage/initramfs.cpio.gz" "$out"
log "built $out ($(du -k "$out" | cut -f1) KiB, busybox $bb_version)"
echo "initramfs=$out"

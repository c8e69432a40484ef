#!/usr/bin/env bash
# Boot the minimal Linux guest under minivmm: builds minivmm, the kernel (from
# Debian's linux-source-6.1) and a busybox initramfs on first use (cached), then
# runs it with the console on this terminal. Extra arguments go to `minivmm run`
# (e.g. --vcpus 4 --memory 1G --timeout 2m).
#
#   scripts/boot-linux.sh [--bzimage] [minivmm run flags...]
#
# On a host with hardware KVM you get a shell from the initramfs; `exit` (or
# `reboot -f`) ends the VM with status 0. Under PVM (see `minivmm check`) the kernel
# prints its early boot lines and then stops with a reported emulation failure.
set -euo pipefail
cd "$(dirname "$0")/.."

image=vmlinux
if [ "${1:-}" = "--bzimage" ]; then image=bzImage; shift; fi

cargo build --release --quiet
out=$(scripts/build-linux.sh --variant mpparse)
kernel=$(sed -n "s/^$image=//p" <<<"$out")
initrd=$(scripts/build-initramfs.sh | sed -n 's/^initramfs=//p')

echo "minivmm: booting $kernel (Ctrl-A x stops the VM)" >&2
exec ./target/release/minivmm run --kernel "$kernel" --initrd "$initrd" \
    --cmdline "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1" --vcpus 2 --memory 256M "$@"

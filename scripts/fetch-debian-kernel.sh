#!/usr/bin/env bash
# Fetch Debian's cloud kernel: the package that linux-image-cloud-amd64
# depends on (e.g. linux-image-6.1.0-NN-cloud-amd64), with `apt-get download`
# and `dpkg -x`. No root needed once apt's lists are there.
#
# Usage: scripts/fetch-debian-kernel.sh [--refresh] [--no-vmlinux]
#
#   --refresh      ask apt which kernel linux-image-cloud-amd64 wants now,
#                  instead of reusing the newest one already in the cache
#   --no-vmlinux   do not extract the ELF vmlinux from the bzImage
#
# Outputs, in ${MINIVMM_CACHE:-${XDG_CACHE_HOME:-~/.cache}/minivmm}/debian-kernel/<package>_<version>/:
#   vmlinuz   the bzImage as Debian ships it (boot/vmlinuz-*)
#   vmlinux   its ELF kernel, decompressed from the bzImage payload: it has
#             the PVH note, so it can be booted through PVH and skips the
#             decompressor (slow where ring 0 is emulated: PVM, see README)
#   config    Debian's kernel config (boot/config-*)
#   modules/  the package's KVM modules: irqbypass.ko, kvm.ko, kvm-amd.ko,
#             kvm-intel.ko (so this kernel can be a KVM host itself, as in
#             scripts/test-nested-kvm.sh), and the virtio ones a minivmm
#             guest needs for --disk, --share and --rng, listed in load order
#             in modules/virtio.order (for build-initramfs.sh --modules), and
#             virtio_console.ko and overlay.ko for `minivmm exec --modules`; the
#             other modules are not kept
# Last lines on stdout: `vmlinuz=PATH`, then `vmlinux=PATH` unless --no-vmlinux,
# then `modules=DIR`.
#
# This kernel has no X86_MPPARSE: it finds CPUs only through the ACPI MADT.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

meta=linux-image-cloud-amd64
refresh=false
want_vmlinux=true
while [ "$#" -gt 0 ]; do
    case "$1" in
        --refresh) refresh=true; shift ;;
        --no-vmlinux) want_vmlinux=false; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1'; usage: $0 [--refresh] [--no-vmlinux]" ;;
    esac
done

cache="$(minivmm_cache_dir)"
base="$cache/debian-kernel"
mkdir -p "$base"

# Read LEN bytes at OFFSET of FILE as an unsigned little-endian integer.
read_le() { # file offset len
    od -An -tu"$3" -j "$2" -N "$3" --endian=little "$1" | tr -d ' \n'
}

# LEN bytes at OFFSET of FILE, in hex.
bytes() { # file offset len
    od -An -tx1 -j "$2" -N "$3" "$1" | tr -d ' \n'
}

# Decompress the payload of the bzImage $1 into the ELF file $2. The payload
# (see Documentation/x86/boot.rst) sits at (setup_sects + 1) * 512 +
# payload_offset and is payload_length bytes long; its last 4 bytes are the
# decompressed size, not part of the compressed stream.
extract_vmlinux() {
    local bz="$1" dst="$2" setup_sects poff plen start magic tool
    [ "$(bytes "$bz" $((0x202)) 4)" = 48647253 ] ||
        die "$bz is not a bzImage (no HdrS magic at 0x202)"
    setup_sects="$(read_le "$bz" $((0x1f1)) 1)"
    [ "$setup_sects" -ne 0 ] || setup_sects=4
    poff="$(read_le "$bz" $((0x248)) 4)"
    plen="$(read_le "$bz" $((0x24c)) 4)"
    start=$(((setup_sects + 1) * 512 + poff))
    magic="$(bytes "$bz" "$start" 6)"
    case "$magic" in
        1f8b*) tool="gzip -dc" ;;
        fd377a585a00) tool="xz -dc --single-stream" ;;
        28b52ffd*) tool="zstd -dcq"; ensure_debs zstd ;;
        02214c18*) tool="lz4 -dcq"; ensure_debs lz4 ;;
        425a68*) tool="bzip2 -dc" ;;
        5d0000*) tool="xz -dc --format=lzma" ;;
        *) die "unknown compression (magic $magic) in $bz's payload; use scripts/extract-vmlinux from the kernel source" ;;
    esac
    log "decompressing $bz's payload (${tool%% *}, $plen bytes at $start)"
    # shellcheck disable=SC2086 # $tool is a command and its flags
    dd if="$bz" iflag=skip_bytes,count_bytes skip="$start" count="$((plen - 4))" status=none | $tool >"$dst.tmp" ||
        die "decompressing $bz's payload with ${tool%% *} failed"
    [ "$(bytes "$dst.tmp" 0 4)" = 7f454c46 ] ||
        die "the payload of $bz did not decompress to an ELF file"
    mv "$dst.tmp" "$dst"
}

print_outputs() {
    echo "vmlinuz=$1/vmlinuz"
    if [ "$want_vmlinux" = true ]; then echo "vmlinux=$1/vmlinux"; fi
    echo "modules=$1/modules"
}

# The modules a KVM host needs, in load order: irqbypass (posted interrupts),
# kvm (the generic core), then the vendor part.
kvm_modules=(irqbypass kvm kvm-amd kvm-intel)
# The guest's virtio modules, in load order (each after what it needs, as
# modules.dep says): the ring and core, the MMIO transport (found through the
# DSDT), then the devices. ext4 is built into this kernel.
virtio_modules=(virtio_ring virtio virtio_mmio virtio_blk virtio-rng fuse virtiofs)
# What `minivmm exec` adds on top (its channel to the host, and the writable
# root over the read-only share); its tests give it this directory as --modules.
exec_modules=(virtio_console overlay)

# Copy the KVM modules out of the unpacked package $1 into $2/modules,
# decompressing them if the package ships them compressed.
keep_kvm_modules() { # unpacked-package-root dest-dir
    local m f
    rm -rf "$2/modules.tmp"
    mkdir -p "$2/modules.tmp"
    for m in "${kvm_modules[@]}" "${virtio_modules[@]}" "${exec_modules[@]}"; do
        f="$(find "$1/lib/modules" -name "$m.ko*" | head -n 1)"
        [ -n "$f" ] || die "the kernel package has no $m.ko; Debian's package layout changed"
        case "$f" in
            *.ko) cp "$f" "$2/modules.tmp/$m.ko" ;;
            *.ko.xz) xz -dc "$f" >"$2/modules.tmp/$m.ko" ;;
            *.ko.zst) ensure_debs zstd; zstd -dcq "$f" >"$2/modules.tmp/$m.ko" ;;
            *) die "cannot read the module $f (unknown compression)" ;;
        esac
    done
    printf '%s.ko\n' "${virtio_modules[@]}" >"$2/modules.tmp/virtio.order"
    rm -rf "$2/modules"
    mv "$2/modules.tmp" "$2/modules"
}

# Which kernel: the newest in the cache, or the one apt resolves now.
dir=""
if [ "$refresh" = false ]; then
    dir="$(find "$base" -mindepth 2 -maxdepth 2 -name vmlinuz 2>/dev/null | sed 's|/vmlinuz$||' | sort -V | tail -n 1)"
fi
if [ -z "$dir" ]; then
    apt_need_lists "$meta"
    pkg="$(apt-cache depends --no-recommends --no-suggests "$meta" |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-cloud-amd64$/ && !n++ { print $2 }')"
    [ -n "$pkg" ] || die "cannot tell which kernel $meta depends on; run apt-get update and retry"
    version="$(deb_candidate_version "$pkg")"
    [ -n "$version" ] || die "apt knows no version of $pkg; run apt-get update and retry"
    dir="$base/${pkg}_$version"
fi

lock_or_wait "$base.lock"
if [ ! -s "$dir/vmlinuz" ] || [ ! -s "$dir/modules/kvm-amd.ko" ] || [ ! -s "$dir/modules/virtio.order" ] ||
    [ ! -s "$dir/modules/overlay.ko" ]; then
    pkg="${dir##*/}"; pkg="${pkg%%_*}"
    tmp="$base/.${pkg}.unpacked"
    deb_download_extract "$pkg" "$tmp"
    mkdir -p "$dir"
    found=false
    for f in "$tmp"/boot/vmlinuz-*; do
        [ -e "$f" ] || continue
        cp "$tmp/boot/config-${f##*/vmlinuz-}" "$dir/config" 2>/dev/null || true
        cp "$f" "$dir/.vmlinuz.tmp" && mv "$dir/.vmlinuz.tmp" "$dir/vmlinuz"
        found=true
    done
    [ "$found" = true ] || { rm -rf "$tmp"; die "$pkg has no boot/vmlinuz-*; Debian's package layout changed"; }
    keep_kvm_modules "$tmp" "$dir"
    rm -rf "$tmp"
    log "fetched $pkg into $dir"
fi
if [ "$want_vmlinux" = true ] && [ ! -s "$dir/vmlinux" ]; then
    extract_vmlinux "$dir/vmlinuz" "$dir/vmlinux"
    if has_pvh_note "$dir/vmlinux"; then
        log "$dir/vmlinux has the PVH entry note"
    else
        log "warning: $dir/vmlinux has no PVH entry note; boot it as a 64-bit ELF or use vmlinuz"
    fi
fi
print_outputs "$dir"

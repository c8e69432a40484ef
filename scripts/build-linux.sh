#!/usr/bin/env bash
# Build minivmm's minimal Linux guest kernel from Debian's linux-source-6.1.
#
# Usage: scripts/build-linux.sh [--variant mpparse|acpi|hostroot]
#
#   mpparse (default)  tinyconfig + scripts/linux/minimal.config: CPUs found
#                      through the MP table (the everyday test kernel)
#   acpi               the same + scripts/linux/acpi.config: ACPI on and the
#                      MP-table parser off, like Debian's kernels (MADT only)
#   hostroot           acpi + scripts/linux/hostroot.config: virtio-pci, 9p,
#                      virtio-console, overlayfs and cgroups built in, to boot
#                      with the host's root as QEMU-based tools share it
#
# Outputs, in ${MINIVMM_CACHE:-${XDG_CACHE_HOME:-~/.cache}/minivmm}/linux-<variant>/:
#   vmlinux   ELF with a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)
#   bzImage   the same kernel, LZ4-compressed, for the 64-bit boot protocol
#   config    the final kernel .config
# The last lines on stdout are `vmlinux=PATH` and `bzImage=PATH`; progress goes
# to stderr. The result is cached, keyed on the config fragments and the
# linux-source-6.1 package version: a second run returns at once.
#
# Environment: MINIVMM_CACHE (cache directory), MINIVMM_JOBS (make -j, default 2).
# Installs what it needs with apt-get when run as root (Debian 12).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"

# Bump when the build steps below change in a way that changes the output.
recipe=1
source_pkg=linux-source-6.1
source_tarball=/usr/src/linux-source-6.1.tar.xz
build_debs=(linux-source-6.1 make gcc libc6-dev flex bison bc libelf-dev lz4 xz-utils)

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

variant=mpparse
while [ "$#" -gt 0 ]; do
    case "$1" in
        --variant) [ "$#" -ge 2 ] || die "--variant needs a value: mpparse, acpi or hostroot"; variant="$2"; shift 2 ;;
        --variant=*) variant="${1#--variant=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1'; usage: $0 [--variant mpparse|acpi|hostroot]" ;;
    esac
done

case "$variant" in
    mpparse) fragments=("$here/linux/minimal.config") ;;
    acpi) fragments=("$here/linux/minimal.config" "$here/linux/acpi.config") ;;
    hostroot) fragments=("$here/linux/minimal.config" "$here/linux/acpi.config" "$here/linux/hostroot.config") ;;
    *) die "unknown variant '$variant'; use --variant mpparse, acpi or hostroot" ;;
esac
for f in "${fragments[@]}"; do
    [ -r "$f" ] || die "config fragment $f is missing; run this script from a complete minivmm checkout"
done

cache="$(minivmm_cache_dir)"
out="$cache/linux-$variant"
jobs="${MINIVMM_JOBS:-2}"

# The cache key: recipe, variant, fragments, source package version, compiler.
cache_key() {
    {
        echo "recipe=$recipe variant=$variant"
        echo "source=$(deb_installed_version "$source_pkg")"
        echo "gcc=$(gcc -dumpfullversion 2>/dev/null || echo none)"
        cat "${fragments[@]}"
    } | sha256_of_stdin
}

print_outputs() {
    echo "vmlinux=$out/vmlinux"
    echo "bzImage=$out/bzImage"
}

is_cached() {
    [ -n "$(deb_installed_version "$source_pkg")" ] &&
        [ -s "$out/vmlinux" ] && [ -s "$out/bzImage" ] && [ -r "$out/key" ] &&
        [ "$(cat "$out/key")" = "$(cache_key)" ]
}

# Fast path: nothing to do.
if is_cached; then
    log "up to date: $out"
    print_outputs
    exit 0
fi

ensure_debs "${build_debs[@]}"
[ -r "$source_tarball" ] || die "$source_tarball is missing although $source_pkg is installed; reinstall it: apt-get install --reinstall $source_pkg"

mkdir -p "$out"
lock_or_wait "$cache/linux-$variant.lock"
# Another run may have finished the same build while we waited.
if is_cached; then
    log "up to date: $out"
    print_outputs
    exit 0
fi

version="$(deb_installed_version "$source_pkg")"
key="$(cache_key)"
start=$SECONDS

# 1. Unpack the source once per package version, shared by all variants.
src="$cache/src/$source_pkg-$version"
if [ ! -e "$src/.minivmm-unpacked" ]; then
    lock_or_wait "$cache/src.lock"
    if [ ! -e "$src/.minivmm-unpacked" ]; then
        log "unpacking $source_tarball ($source_pkg $version) into $src"
        mkdir -p "$cache/src"
        tmp="$(mktemp -d "$cache/src/.unpack.XXXXXX")"
        tar -xJf "$source_tarball" -C "$tmp" || { rm -rf "$tmp"; die "cannot unpack $source_tarball; is the disk full?"; }
        [ -d "$tmp/linux-source-6.1" ] || { rm -rf "$tmp"; die "$source_tarball did not contain linux-source-6.1/"; }
        touch "$tmp/linux-source-6.1/.minivmm-unpacked"
        rm -rf "$src"
        mv "$tmp/linux-source-6.1" "$src"
        rm -rf "$tmp"
    fi
fi

# 2. Configure out of tree: tinyconfig, then the fragments, then defaults.
build="$cache/build/linux-$variant"
if [ -r "$build/.minivmm-source" ] && [ "$(cat "$build/.minivmm-source")" != "$src" ]; then
    log "source changed; starting $build afresh"
    rm -rf "$build"
fi
mkdir -p "$build"
echo "$src" >"$build/.minivmm-source"

kmake() {
    make -C "$src" O="$build" "$@" </dev/null >&2
}

log "configuring $variant in $build"
kmake -s tinyconfig >"$build/tinyconfig.log" 2>&1 ||
    { cat "$build/tinyconfig.log" >&2; die "make tinyconfig failed; see the messages above"; }
(cd "$src" && ./scripts/kconfig/merge_config.sh -m -O "$build" "$build/.config" "${fragments[@]}") >"$build/merge_config.log" 2>&1 ||
    { cat "$build/merge_config.log" >&2; die "merging ${fragments[*]} failed; see the messages above"; }
kmake -s olddefconfig || die "make olddefconfig failed; see the messages above"

# Every option of the fragments (the last fragment that names it wins) must
# have survived olddefconfig: Kconfig silently drops an option whose
# dependencies are not met.
declare -A want=()
order=()
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) sym="${line%%=*}" ;;
        "# CONFIG_"*" is not set") sym="${line#\# }"; sym="${sym%% *}" ;;
        *) continue ;;
    esac
    [ -n "${want[$sym]+set}" ] || order+=("$sym")
    want[$sym]="$line"
done < <(cat "${fragments[@]}")
bad=()
for sym in "${order[@]}"; do
    line="${want[$sym]}"
    got="$(grep -E "^$sym=|^# $sym is not set" "$build/.config" || true)"
    case "$line" in
        CONFIG_*=*) [ "$got" = "$line" ] || bad+=("$line (got: ${got:-absent})") ;;
        *) case "$got" in "$sym="*) bad+=("$line (got: $got)") ;; esac ;;
    esac
done
if [ "${#bad[@]}" -gt 0 ]; then
    printf '  %s\n' "${bad[@]}" >&2
    die "the kernel config lacks these options from ${fragments[*]}; fix their dependencies in the fragment"
fi

# 3. Build.
log "building vmlinux and bzImage with make -j$jobs (a few minutes)"
kmake -j"$jobs" vmlinux bzImage || die "the kernel build failed; see the compiler messages above"

# 4. Check the PVH entry note (Xen ELF note type 18, XEN_ELFNOTE_PHYS32_ENTRY).
if ! has_pvh_note "$build/vmlinux"; then
    die "$build/vmlinux has no PVH entry note (Xen ELF note type 18); is CONFIG_PVH=y in $build/.config?"
fi

# 5. Publish atomically: outputs first, key last.
rm -f "$out/key"
for f in vmlinux arch/x86/boot/bzImage .config; do
    name="${f##*/}"; [ "$name" = .config ] && name=config
    cp "$build/$f" "$out/.$name.tmp"
    mv "$out/.$name.tmp" "$out/$name"
done
echo "$key" >"$out/key"
log "built $variant in $((SECONDS - start)) s: $out"
print_outputs

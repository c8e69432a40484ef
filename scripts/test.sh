#!/usr/bin/env bash
# The whole test suite, as README.md gives it: installs what the tests need (a C
# toolchain for the tiny guests, the packages to build the minimal Linux guest),
# builds the guest kernels once (cached), then runs every test with one release build.
set -euo pipefail
cd "$(dirname "$0")/.."

# gcc/make/ld build the tiny guests; iasl (acpica-tools) checks minivmm's ACPI tables.
need_pkgs=()
for tool in gcc make ld; do
    command -v "$tool" >/dev/null || need_pkgs+=(build-essential)
done
command -v iasl >/dev/null || need_pkgs+=(acpica-tools)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "test.sh: installing ${need_pkgs[*]}" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        $(printf '%s\n' "${need_pkgs[@]}" | sort -u)
fi
export MINIVMM_REQUIRE_IASL="${MINIVMM_REQUIRE_IASL:-1}"

# Guest Linux kernels (built from Debian's linux-source, cached outside the repo).
# The tests find them through these variables; without them Linux tests skip loudly,
# and with MINIVMM_REQUIRE_LINUX=1 they fail instead.
if [ -z "${MINIVMM_SKIP_LINUX:-}" ]; then
    out=$(scripts/build-linux.sh --variant mpparse)
    export MINIVMM_LINUX_VMLINUX="$(sed -n 's/^vmlinux=//p' <<<"$out")"
    export MINIVMM_LINUX_BZIMAGE="$(sed -n 's/^bzImage=//p' <<<"$out")"
    out=$(scripts/build-initramfs.sh --cmd 'cat /proc/cpuinfo | grep -c ^processor')
    export MINIVMM_INITRAMFS="$(sed -n 's/^initramfs=//p' <<<"$out")"
    # Built like Debian's kernels: ACPI on, MP-table parser off (CPUs from the MADT).
    out=$(scripts/build-linux.sh --variant acpi)
    export MINIVMM_LINUX_ACPI_VMLINUX="$(sed -n 's/^vmlinux=//p' <<<"$out")"
    out=$(scripts/build-initramfs.sh --poweroff --cmd 'cat /proc/cpuinfo | grep -c ^processor')
    export MINIVMM_INITRAMFS_POWEROFF="$(sed -n 's/^initramfs=//p' <<<"$out")"
    # Debian's own cloud kernel (apt-get download + dpkg -x), and its extracted ELF.
    out=$(scripts/fetch-debian-kernel.sh)
    export MINIVMM_DEBIAN_VMLINUX="$(sed -n 's/^vmlinux=//p' <<<"$out")"
    export MINIVMM_REQUIRE_LINUX="${MINIVMM_REQUIRE_LINUX:-1}"
fi

exec cargo test --release "$@"

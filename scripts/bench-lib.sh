# shellcheck shell=bash
# Shared helpers for scripts/bench-*.sh. Source it after scripts/lib.sh.
#
# Every measurement goes through examples/bench_run.rs (wait4 rusage: wall time to
# the microsecond, user+sys CPU, peak RSS), which prints key=value lines; the
# functions below collect those lines in a file per series and take medians.

bench_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Builds minivmm and the bench examples (release) and sets MINIVMM, BENCH_RUN,
# EXIT_FLOOR, VM_CYCLE to their paths.
bench_build_tools() {
    command -v cargo >/dev/null || die "cargo is missing; install Rust (https://rustup.rs) to build minivmm"
    log "building minivmm and the bench tools (cargo build --release)"
    (cd "$bench_root" && cargo build --release --quiet --bin minivmm --example bench_run --example exit_floor --example vm_cycle) ||
        die "cargo build --release failed; see the messages above"
    local target="${CARGO_TARGET_DIR:-$bench_root/target}"
    # shellcheck disable=SC2034 # used by the scripts that source this file
    MINIVMM="$target/release/minivmm"
    # shellcheck disable=SC2034
    BENCH_RUN="$target/release/examples/bench_run"
    # shellcheck disable=SC2034
    EXIT_FLOOR="$target/release/examples/exit_floor"
    # shellcheck disable=SC2034
    VM_CYCLE="$target/release/examples/vm_cycle"
}

# Builds the PVH bench guests into DIR (hello.elf, exits-N.elf for each N given).
bench_build_guests() {
    local dir="$1"
    shift
    if ! command -v gcc >/dev/null || ! command -v ld >/dev/null || ! command -v make >/dev/null; then
        ensure_debs gcc binutils make
    fi
    make -s -C "$bench_root/bench/guests" O="$dir" EXIT_COUNTS="$*" >&2 ||
        die "building the bench guests failed; see the messages above"
}

# Installs QEMU (Debian's qemu-system-x86) when it is missing.
bench_need_qemu() {
    command -v qemu-system-x86_64 >/dev/null || ensure_debs qemu-system-x86
    # shellcheck disable=SC2034
    QEMU="$(command -v qemu-system-x86_64)"
}

# Checks /dev/kvm before anything is measured.
bench_need_kvm() {
    if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
        die "/dev/kvm is missing or not usable; these benchmarks need KVM (see 'minivmm check')"
    fi
}

# QEMU's common flags on this kind of host: KVM, the host CPU without the
# arch-capabilities MSR (PVM aborts on MSR 0x10a), no devices but ours.
# shellcheck disable=SC2034,SC2054 # used by the scripts; the commas are QEMU's
qemu_base=(-enable-kvm -cpu host,-arch-capabilities -nographic -no-reboot -nodefaults
    -device isa-debug-exit,iobase=0xf4,iosize=0x04)
# shellcheck disable=SC2034,SC2054
qemu_microvm=(-M microvm,x-option-roms=off,rtc=off)
# shellcheck disable=SC2034,SC2054
qemu_microvm_nopit=(-M microvm,x-option-roms=off,rtc=off,pit=off)
# shellcheck disable=SC2034
qemu_pc=(-M pc)

# Value of KEY in a bench_run line.
kv() {
    local key="$1" line="$2"
    sed -n "s/.*\\b$key=\\([^ ]*\\).*/\\1/p" <<<"$line"
}

# Median of the numbers on stdin (one a line); "-" when there are none.
median() {
    sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "-"; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# Median of KEY over the bench_run lines in FILE.
median_of() {
    local key="$1" file="$2"
    sed -n "s/.*\\b$key=\\([^ ]*\\).*/\\1/p" "$file" | median
}

# a / b with 2 decimals, "-" when either is missing or b is 0.
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b + 0 == 0) print "-"; else printf "%.2f\n", a / b }'
}

# The host and its load, for the record.
bench_host_line() {
    local cpu kvm
    cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
    if [ -d /sys/module/kvm_pvm ]; then
        kvm="PVM (kvm_pvm: guest ring 0 emulated)"
    elif [ -d /sys/module/kvm_intel ]; then
        kvm="hardware (kvm_intel)"
    elif [ -d /sys/module/kvm_amd ]; then
        kvm="hardware (kvm_amd)"
    else
        kvm="unknown"
    fi
    printf 'host: %s, %s cores; KVM: %s; kernel %s; %s\n' \
        "$cpu" "$(nproc)" "$kvm" "$(uname -r)" "load average:$(uptime | sed 's/.*load average://')"
}

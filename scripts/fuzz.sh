#!/usr/bin/env bash
# Coverage-guided fuzzing of what a guest or a user hands minivmm, with libFuzzer
# on the stable toolchain.
#
# Usage: scripts/fuzz.sh [--seconds N] [TARGET...]
#
#   --seconds N   how long each target runs (default 60; CI runs a short pass)
#   TARGET        any of: kernel_load virtio_queue ports exec_channel sizes
#                 (default: all)
#
# The targets live in fuzz/ (a crate of its own, outside the main build). They
# are built with SanitizerCoverage (rustc's `-C passes=sancov-module`, what
# cargo-fuzz passes too, minus its nightly-only AddressSanitizer: the code is safe
# Rust) and with overflow checks and debug assertions on, so an unchecked
# overflow in guest-controlled arithmetic is a finding. Each target starts from
# its seeds in fuzz/corpus/TARGET and keeps what it learns in
# target/fuzz/corpus/TARGET (not committed). A crash, panic or timeout leaves the
# input in target/fuzz/artifacts/TARGET/ and fails the run; reproduce it with
#   target/fuzz/x86_64-unknown-linux-gnu/release/TARGET FILE
# The last lines give, per target, the executions and the findings.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"
cd "$here/.."

all="kernel_load virtio_queue ports exec_channel sizes"
seconds=60
targets=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --seconds) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--seconds needs a whole number of seconds"; seconds="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        -*) die "unknown option '$1'; see $0 --help" ;;
        *) [[ " $all " == *" $1 "* ]] || die "unknown target '$1'; the targets are: $all"; targets+=("$1"); shift ;;
    esac
done
[ "${#targets[@]}" -gt 0 ] || read -r -a targets <<<"$all"

command -v c++ >/dev/null || die "libFuzzer is C++: install a C++ compiler (Debian: build-essential)"

out="$PWD/target/fuzz"
triple="x86_64-unknown-linux-gnu"
log "building ${targets[*]} with coverage instrumentation"
# --target keeps these flags off build scripts and proc macros, which are not
# linked with libFuzzer's coverage callbacks.
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing" \
    cargo build --release --quiet --manifest-path fuzz/Cargo.toml --target "$triple" \
    --target-dir "$out" || die "building the fuzz targets failed (see above)"

scratch="$out/scratch"
trap 'rm -rf "$scratch"' EXIT
status=0
summary=()
for t in "${targets[@]}"; do
    # Findings are per run: a fixed one must not be counted again.
    rm -rf "$out/artifacts/$t"
    mkdir -p "$out/corpus/$t" "$out/artifacts/$t" "$scratch"
    log "fuzzing $t for $seconds s"
    # -timeout: one input taking over 10 s is a finding (a guest-driven hang).
    # -rss_limit_mb: a 64 MiB VM's loader must not need more than this.
    rc=0
    MINIVMM_FUZZ_DIR="$scratch" "$out/$triple/release/$t" -max_total_time="$seconds" \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$out/artifacts/$t/" "$out/corpus/$t" "fuzz/corpus/$t" \
        >"$out/$t.log" 2>&1 || rc=$?
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$out/$t.log" | tail -n 1)"
    corpus="$(find "$out/corpus/$t" -type f | wc -l)"
    found="$(find "$out/artifacts/$t" -type f | wc -l)"
    if [ "$rc" != 0 ]; then
        status=1
        tail -n 40 "$out/$t.log" >&2
        log "$t FAILED (status $rc); its input is in $out/artifacts/$t/"
    fi
    summary+=("$t: ${execs:-?} executions in $seconds s, corpus $corpus inputs, findings $found (status $rc)")
done
for line in "${summary[@]}"; do log "$line"; done
exit "$status"

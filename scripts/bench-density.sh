#!/usr/bin/env bash
# Density and start rate: N tiny VMs started at once, for each N given.
#
# Usage: scripts/bench-density.sh [--qemu] [N...]        (default N: 50 200)
#
# Each VM is bench/guests/hello.elf (128M guest RAM, not prefaulted), run with
# `minivmm run --no-ledger` so the local ledger (8 usable vCPUs here) does not
# refuse the crowd — admission is measured by the pool benches, not here.
# For each N prints: how long spawning took, when the last VM ended, VMs per
# second (N / time to the last end: every VM started, ran and exited inside
# it), how many exited with the expected status 1, the sum and max of peak
# RSS, and host memory used (largest drop of MemAvailable during the run).
# --qemu runs the same with QEMU microvm afterwards, for the ratio.
#
# Then the concurrent test: N copies of bench/guests/park.elf (prints "parked",
# then halts for ever) started at once and all alive together: time until every
# one has printed its line (parked_per_s = N / that), host memory used (drop of
# MemAvailable) and the sum of Pss (proportional RSS: shared pages counted once)
# with all N parked; then all are killed.
# Exits non-zero when any VM did not finish correctly or never parked.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"
# shellcheck source=scripts/bench-lib.sh
. "$here/bench-lib.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

with_qemu=false counts=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --qemu) with_qemu=true; shift ;;
        -h|--help) usage; exit 0 ;;
        *[!0-9]*|'') die "unknown argument '$1'; see $0 --help" ;;
        *) counts+=("$1"); shift ;;
    esac
done
[ "${#counts[@]}" -gt 0 ] || counts=(50 200)

bench_need_kvm
bench_build_tools
[ "$with_qemu" = false ] || bench_need_qemu
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
bench_build_guests "$work/guests"
hello="$work/guests/hello.elf"
park="$work/guests/park.elf"

now_ms() { echo $(($(date +%s%N) / 1000000)); }
mem_available_kib() { awk '$1 == "MemAvailable:" { print $2 }' /proc/meminfo; }

# park_crowd VMM N: N parked VMs at once; prints one line of results.
park_crowd() {
    local vmm="$1" n="$2" dir="$work/park-$1-$2" pids=() i before t0 t_all="" parked pss
    mkdir -p "$dir"
    before="$(mem_available_kib)"
    t0="$(now_ms)"
    for i in $(seq "$n"); do
        case "$vmm" in
            minivmm) "$MINIVMM" run --no-ledger --kernel "$park" --serial-out "$dir/$i.out" </dev/null >/dev/null 2>&1 & ;;
            qemu) "$QEMU" "${qemu_base[@]}" "${qemu_microvm[@]}" -m 128M -smp 1 -serial "file:$dir/$i.out" \
                -kernel "$park" </dev/null >/dev/null 2>&1 & ;;
        esac
        pids+=($!)
    done
    for _ in $(seq 12000); do
        parked="$({ grep -l parked "$dir"/*.out 2>/dev/null || true; } | wc -l)"
        [ "$parked" -lt "$n" ] || { t_all="$(now_ms)"; break; }
        sleep 0.01
    done
    sleep 0.2
    local used=$((before - $(mem_available_kib)))
    pss="$(for i in "${pids[@]}"; do awk '$1 == "Pss:" { print $2 }' "/proc/$i/smaps_rollup" 2>/dev/null; done | awk '{ s += $1 } END { print s + 0 }')"
    local alive=0
    for i in "${pids[@]}"; do kill -0 "$i" 2>/dev/null && alive=$((alive + 1)); done
    kill -9 "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    if [ -z "$t_all" ]; then
        echo "$vmm park n=$n parked=$parked FAILED: not all VMs printed their line within 120 s"
        failed=$((failed + n - parked))
        return
    fi
    awk -v vmm="$vmm" -v n="$n" -v ms="$((t_all - t0))" -v used="$used" -v pss="$pss" -v alive="$alive" 'BEGIN {
        printf "%-7s park n=%d all_parked_ms=%d parked_per_s=%.1f alive=%d mem_used_kib=%d (%.2f MiB/VM) sum_pss_kib=%d (%.2f MiB/VM)\n",
            vmm, n, ms, n / (ms / 1e3), alive, used, used / n / 1024, pss, pss / n / 1024 }'
    [ "$alive" -eq "$n" ] || failed=$((failed + n - alive))
}

failed=0
export BENCH_EXPECT_STATUS=1
echo "# $(bench_host_line)"
for n in "${counts[@]}"; do
    line="$("$BENCH_RUN" --parallel "$n" --timeout 300 -- "$MINIVMM" run --no-ledger --kernel "$hello" --serial none)"
    echo "minivmm $line"
    [ "$(kv failed "$line")" = 0 ] || failed=$((failed + $(kv failed "$line")))
    if [ "$with_qemu" = true ]; then
        line="$("$BENCH_RUN" --parallel "$n" --timeout 300 -- "$QEMU" "${qemu_base[@]}" "${qemu_microvm[@]}" \
            -m 128M -smp 1 -serial null -kernel "$hello")"
        echo "qemu    $line"
        [ "$(kv failed "$line")" = 0 ] || failed=$((failed + $(kv failed "$line")))
    fi
done
for n in "${counts[@]}"; do
    park_crowd minivmm "$n"
    [ "$with_qemu" = false ] || park_crowd qemu "$n"
done
echo "# load after: $(uptime | sed 's/.*load average://')"
[ "$failed" -eq 0 ] || die "$failed VM(s) did not exit with status 1; see 'statuses=' above"

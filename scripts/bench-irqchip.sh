#!/usr/bin/env bash
# The interrupt controllers in the host kernel or in minivmm (--irqchip kernel vs
# split), side by side in one run, with QEMU microvm on the same guest file:
#
#   1. hello (bench/guests/hello.elf), process start to exit, with minivmm's
#      default flags -- the ledger included, on a private pool in a temporary
#      directory -- in each mode, alternating with QEMU microvm (--runs each).
#   2. VM create + destroy from the library in a loop (examples/vm_cycle.rs,
#      --cycles each): medians and 90th percentiles.
#   3. --crowd tiny VMs (hello, --no-ledger: the local ledger would refuse the
#      crowd) started at once in each mode: VMs per second to the last exit, and
#      the host memory they used at the peak (drop of MemAvailable).
#
# Usage: scripts/bench-irqchip.sh [--runs N] [--cycles N] [--crowd N]
#        defaults: --runs 21 --cycles 200 --crowd 1000
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"
# shellcheck source=scripts/bench-lib.sh
. "$here/bench-lib.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

runs=21 cycles=200 crowd=1000
while [ "$#" -gt 0 ]; do
    case "$1" in
        --runs) runs="${2:?--runs needs a number}"; shift 2 ;;
        --cycles) cycles="${2:?--cycles needs a number}"; shift 2 ;;
        --crowd) crowd="${2:?--crowd needs a number}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1'; see $0 --help" ;;
    esac
done

bench_need_kvm
bench_need_qemu
bench_build_tools
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
bench_build_guests "$work/guests"
hello="$work/guests/hello.elf"
export MINIVMM_POOL="$work/pool.db"
"$MINIVMM" pool init >/dev/null

echo "# $(bench_host_line)"
failures=0
# one SERIES CMD...: one hello run, its bench_run line appended to SERIES.txt.
one() {
    local series="$1" line
    shift
    line="$("$BENCH_RUN" --timeout 60 -- "$@")"
    echo "$line" >>"$work/$series.txt"
    [ "$(kv status "$line")" = 1 ] || { log "FAILED: $series: $line"; failures=$((failures + 1)); }
}
for _ in $(seq "$runs"); do
    one split "$MINIVMM" run --kernel "$hello" --serial none --irqchip split
    one kernel "$MINIVMM" run --kernel "$hello" --serial none --irqchip kernel
    one qemu "$QEMU" "${qemu_base[@]}" "${qemu_microvm[@]}" -m 128M -smp 1 -serial null -kernel "$hello"
done
q="$(median_of wall_ms "$work/qemu.txt")"
echo "# 1. hello, process start to exit, default flags with the ledger ($runs runs each, medians)"
printf '%-22s %9s %9s %9s %10s\n' vmm wall_ms cpu_ms rss_MiB vs_qemu
for s in split kernel qemu; do
    w="$(median_of wall_ms "$work/$s.txt")"
    printf '%-22s %9s %9s %9s %10s\n' "$s" "$w" "$(median_of cpu_ms "$work/$s.txt")" \
        "$(awk -v k="$(median_of maxrss_kib "$work/$s.txt")" 'BEGIN { printf "%.1f", k / 1024 }')" "$(ratio "$w" "$q")"
done

echo "# 2. create + destroy from the library ($cycles cycles; median/p90 ms)"
for m in split kernel; do
    "$VM_CYCLE" --irqchip "$m" --count "$cycles" "$hello"
done

echo "# 3. $crowd VMs started at once (--no-ledger)"
export BENCH_EXPECT_STATUS=1
for m in split kernel; do
    line="$("$BENCH_RUN" --parallel "$crowd" --timeout 600 -- "$MINIVMM" run --no-ledger --kernel "$hello" --serial none --irqchip "$m")"
    echo "$m $line"
    [ "$(kv failed "$line")" = 0 ] || failures=$((failures + $(kv failed "$line")))
done
echo "# load after: $(uptime | sed 's/.*load average://')"
[ "$failures" -eq 0 ] || die "$failures VM run(s) failed; see the FAILED lines and statuses above"

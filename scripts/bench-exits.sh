#!/usr/bin/env bash
# Exit cost: a guest doing N port writes to an ignored port (0x80), under minivmm,
# against the floor — examples/exit_floor.rs, a bare kvm-ioctls loop running the
# same three instructions — and against QEMU microvm. Then the VM life-cycle
# floor: KVM create and destroy with nothing, with the irqchip, with irqchip + PIT.
#
# Usage: scripts/bench-exits.sh [--count N] [--repeat R] [--no-qemu]
#        (defaults: N = 1000000, R = 3)
#
# Runs alternate minivmm, floor, QEMU R times; prints median exits/s of each
# and the ratios minivmm/floor and minivmm/QEMU. minivmm's rate is its --json
# exits_total / run_ms; the floor's is its own count; QEMU's is N+1 exits over
# its whole wall time minus its median hello wall time (its start-up), so an
# estimate. Under PVM every guest instruction of the loop is emulated too
# (~2.8 us each): a run of 1M takes 10-20 s here; pass a smaller --count if
# that is too long. Exits non-zero when a run fails.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
. "$here/lib.sh"
# shellcheck source=scripts/bench-lib.sh
. "$here/bench-lib.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

count=1000000 repeat=3 with_qemu=true
while [ "$#" -gt 0 ]; do
    case "$1" in
        --count) count="${2:?--count needs a number}"; shift 2 ;;
        --repeat) repeat="${2:?--repeat needs a number}"; shift 2 ;;
        --no-qemu) with_qemu=false; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1'; see $0 --help" ;;
    esac
done
case "$count" in '' | *[!0-9]* | 0) die "--count must be a positive integer" ;; esac

bench_need_kvm
bench_build_tools
[ "$with_qemu" = false ] || bench_need_qemu
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
bench_build_guests "$work/guests" "$count"
guest="$work/guests/exits-$count.elf"
hello="$work/guests/hello.elf"

echo "# $(bench_host_line)"
: >"$work/m.txt"
: >"$work/f.txt"
: >"$work/q.txt"
: >"$work/qh.txt"
for i in $(seq "$repeat"); do
    json="$("$MINIVMM" run --no-ledger --kernel "$guest" --serial none --json)" && rc=0 || rc=$?
    [ "$rc" = 1 ] || die "minivmm run $i of the exits guest ended with status $rc: $json"
    exits="$(sed -n 's/.*"exits_total":\([0-9]*\).*/\1/p' <<<"$json")"
    run_ms="$(sed -n 's/.*"run_ms":\([0-9.]*\).*/\1/p' <<<"$json")"
    awk -v e="$exits" -v ms="$run_ms" 'BEGIN { printf "exits_per_s=%.0f run_ms=%s exits=%s\n", e / (ms / 1e3), ms, e }' | tee -a "$work/m.txt" | sed 's/^/minivmm /'
    floor="$("$EXIT_FLOOR" --count "$count" --pit)" || die "exit_floor failed: $floor"
    sed 's/[{}"]//g; s/:/=/g; s/,/ /g' <<<"$floor" | tee -a "$work/f.txt" | sed 's/^/floor   /'
    if [ "$with_qemu" = true ]; then
        "$BENCH_RUN" -- "$QEMU" "${qemu_base[@]}" "${qemu_microvm[@]}" -m 128M -smp 1 -serial null -kernel "$hello" >>"$work/qh.txt"
        line="$("$BENCH_RUN" --timeout 600 -- "$QEMU" "${qemu_base[@]}" "${qemu_microvm[@]}" -m 128M -smp 1 -serial null -kernel "$guest")"
        [ "$(kv status "$line")" = 1 ] || die "QEMU run $i of the exits guest failed: $line"
        echo "$line" | tee -a "$work/q.txt" | sed 's/^/qemu    /'
    fi
done

m="$(median_of exits_per_s "$work/m.txt")"
f="$(median_of exits_per_s "$work/f.txt")"
echo "# N = $count port writes (+1 debug-exit), $repeat runs each, medians"
printf '%-28s %12s exits/s  %8s ns/exit\n' "minivmm" "$m" "$(awk -v r="$m" 'BEGIN{printf "%.0f", 1e9/r}')"
printf '%-28s %12s exits/s  %8s ns/exit\n' "floor (bare kvm-ioctls loop)" "$f" "$(awk -v r="$f" 'BEGIN{printf "%.0f", 1e9/r}')"
if [ "$with_qemu" = true ]; then
    qw="$(median_of wall_ms "$work/q.txt")"
    qh="$(median_of wall_ms "$work/qh.txt")"
    q="$(awk -v n="$count" -v w="$qw" -v h="$qh" 'BEGIN { printf "%.0f", (n + 1) / ((w - h) / 1e3) }')"
    printf '%-28s %12s exits/s  %8s ns/exit  (wall %s ms - hello wall %s ms)\n' "qemu microvm (estimate)" "$q" "$(awk -v r="$q" 'BEGIN{printf "%.0f", 1e9/r}')" "$qw" "$qh"
    echo "ratio minivmm/floor = $(ratio "$m" "$f"), minivmm/qemu = $(ratio "$m" "$q")"
else
    echo "ratio minivmm/floor = $(ratio "$m" "$f")"
fi

echo "# VM life-cycle floor (exit_floor --count 1, 10 runs each, medians)"
for mode in "" --irqchip --pit; do
    "$EXIT_FLOOR" --count 1 --repeat 10 $mode | sed 's/[{}"]//g; s/:/=/g; s/,/ /g' >"$work/life.txt"
    printf '%-22s create_ms=%s destroy_ms=%s\n' "bare VM ${mode#--}" \
        "$(median_of create_ms "$work/life.txt")" "$(median_of destroy_ms "$work/life.txt")"
done
echo "# load after: $(uptime | sed 's/.*load average://')"

#!/usr/bin/env bash
# Stop latency: how long after a stop request minivmm ends, whatever the guest does.
#
# Usage: scripts/bench-stop.sh [--vcpus N] [--repeat R] [--minivmm PATH]
#        (defaults: N = 64, R = 5, the release build of this tree)
#
# Three series, R runs each, every VM N vCPUs all kept busy by a tiny guest built
# here (the BSP starts every AP with INIT-SIPI-SIPI into a real-mode `jmp .` and
# spins itself; the same as tests/common's BUSY_SMP_GUEST):
#   timeout  --timeout 1s: the process's wall time, and the stop latency, run_ms
#            of the --json summary minus the 1000 ms asked for;
#   sigterm  SIGTERM once the VM's claim is in the ledger: time from kill(1) to
#            the process's end;
#   locked   SIGTERM while admission waits for the pool's write lock (another
#            process holds BEGIN IMMEDIATE for 40 s): time from kill(1) to the end.
# Prints every run and the median and maximum of each series, in milliseconds.
# Needs gcc and ld (for the guest), python3 (for the lock holder) and /dev/kvm.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
vcpus=64 repeat=5 minivmm=""
while [ "$#" -gt 0 ]; do
    case "$1" in
        --vcpus) vcpus="${2:?--vcpus needs a number}"; shift 2 ;;
        --repeat) repeat="${2:?--repeat needs a number}"; shift 2 ;;
        --minivmm) minivmm="${2:?--minivmm needs a path}"; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "bench-stop: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ -z "$minivmm" ]; then
    (cd "$root" && cargo build --release --quiet --bin minivmm)
    minivmm="${CARGO_TARGET_DIR:-$root/target}/release/minivmm"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
spin="$work/busy-smp.elf"
cat >"$work/busy-smp.S" <<'ASM'
.section .note.Xen, "a"
.align 4
.long 4, 4, 18
.asciz "Xen"
.align 4
.long _start
.text
.code32
.globl _start
_start:
  movl $0xfeeb, 0x10000
  orl $0x100, 0xfee000f0
  movl $0, 0xfee00310
  movl $0x000c4500, 0xfee00300
  mov $200000, %ecx
1: dec %ecx
  jnz 1b
  movl $0x000c4610, 0xfee00300
  mov $20000, %ecx
2: dec %ecx
  jnz 2b
  movl $0x000c4610, 0xfee00300
3: jmp 3b
ASM
gcc -c "$work/busy-smp.S" -o "$work/busy-smp.o"
ld -static -nostdlib -Ttext=0x100000 -o "$spin" "$work/busy-smp.o"
pool="$work/pool.db"
"$minivmm" pool --pool "$pool" init >/dev/null
# Room for N vCPUs on this host, whatever its core count.
host="$("$minivmm" pool --pool "$pool" --json list | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["name"])')"
"$minivmm" pool --pool "$pool" set-host "$host" --cpu-ratio 1000 >/dev/null

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
stats() { # name values...
    local name="$1"; shift
    printf '%s\n' "$@" | sort -n | awk -v n="$name" '{v[NR]=$1} END {printf "%-8s median %6d ms  max %6d ms  (%d runs)\n", n, v[int((NR+1)/2)], v[NR], NR}'
}
run_vm() { # extra args...
    "$minivmm" run --pool "$pool" --no-pit --serial none --vcpus "$vcpus" --memory 64M --kernel "$spin" "$@"
}
# In the background, as `run_vm_bg &`: exec, so that $! is minivmm's own pid.
run_vm_bg() {
    exec "$minivmm" run --pool "$pool" --no-pit --serial none --vcpus "$vcpus" --memory 64M --kernel "$spin" 2>/dev/null
}
wait_claimed() { # pid
    local i
    for i in $(seq 1 3000); do
        "$minivmm" pool --pool "$pool" allocations 2>/dev/null | grep -q "pid $1 " && return 0
        kill -0 "$1" 2>/dev/null || return 1
        sleep 0.01
    done
    return 1
}

timeouts=() walls=() terms=() locked=()
for i in $(seq 1 "$repeat"); do
    t0=$(now_ms)
    run_vm --timeout 1s --json-out "$work/t.json" 2>/dev/null || true
    wall=$(( $(now_ms) - t0 ))
    run_ms=$(python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["run_ms"]))' "$work/t.json")
    echo "timeout  run $i: wall $wall ms, run_ms $run_ms, stop latency $(( run_ms - 1000 )) ms"
    walls+=("$wall") timeouts+=("$(( run_ms - 1000 ))")

    run_vm_bg & pid=$!
    wait_claimed "$pid" || { echo "bench-stop: the VM never claimed" >&2; exit 1; }
    sleep 0.3
    t0=$(now_ms); kill -TERM "$pid"; wait "$pid" || true
    d=$(( $(now_ms) - t0 )); echo "sigterm  run $i: $d ms"; terms+=("$d")

    python3 -c 'import sqlite3,sys,time; c=sqlite3.connect(sys.argv[1], isolation_level=None); c.execute("BEGIN IMMEDIATE"); print("locked", flush=True); time.sleep(40)' "$pool" >"$work/lock.out" & holder=$!
    until grep -q locked "$work/lock.out" 2>/dev/null; do sleep 0.01; done
    run_vm_bg & pid=$!
    # Signals are blocked (SigBlk has SIGTERM's bit 15) once run() began admission.
    until grep -q '^SigBlk:.*[4-7c-f]...$' "/proc/$pid/status" 2>/dev/null; do sleep 0.01; done
    sleep 0.3
    t0=$(now_ms); kill -TERM "$pid"; wait "$pid" || true
    d=$(( $(now_ms) - t0 )); echo "locked   run $i: $d ms"; locked+=("$d")
    kill "$holder" 2>/dev/null || true; wait "$holder" 2>/dev/null || true
done
echo "--- $vcpus vCPUs, $(nproc) host cores"
stats wall "${walls[@]}"
stats timeout "${timeouts[@]}"
stats sigterm "${terms[@]}"
stats locked "${locked[@]}"

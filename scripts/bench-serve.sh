#!/usr/bin/env bash
# The host agent under load: N tiny VMs (default 200) created through its API at
# once, all running; GET /v1/vms timed while they run; then all deleted, and the
# ledger, the process table and the state directory checked empty.
#
# The VMs run guest/irq with wait=0, which halts waiting for serial input that
# never comes, its timer masked: a parked VM costs its process and a halted vCPU,
# no CPU time.
#
#   scripts/bench-serve.sh [N] [PARALLEL]
#
# Prints create-to-running latency (p50/p99: POST /v1/vms answers once the VM's
# vCPUs run), GET /v1/vms latency (p50/p99 over 200 requests), the agent's RSS, and
# the VM processes' RSS per VM. Needs curl (installed from Debian if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
# shellcheck source=scripts/bench-lib.sh
. scripts/bench-lib.sh

n="${1:-200}"
par="${2:-16}"
command -v curl >/dev/null || ensure_debs curl
bench_build_tools
work="$(mktemp -d "${CARGO_TARGET_DIR:-$PWD/target}/bench-serve.XXXXXX")"
agent=""
cleanup() {
    [ -n "$agent" ] && kill "$agent" 2>/dev/null || true
    pkill -KILL -f "minivmm run .*--pool $work/pool.db" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
make -s -C guest O="$work/images" >&2
sock="$work/agent.sock"
pool="$work/pool.db"
"$MINIVMM" pool --pool "$pool" init >/dev/null
# Room for N VMs of 1 vCPU and 64 MiB on this host, whatever its size.
"$MINIVMM" pool --pool "$pool" set-host "$(hostname)" --vcpus "$n" --cpu-ratio 1 \
    --memory "$((n * 64 + 1024))M" >/dev/null
"$MINIVMM" serve --socket "$sock" --state-dir "$work/state" --images "$work/images" \
    --pool "$pool" 2>"$work/agent.log" &
agent=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || die "the agent did not start: $(cat "$work/agent.log")"

api() { curl -s --unix-socket "$sock" "$@"; }
pct() { # pct P FILE: the P-th percentile of the numbers in FILE, in ms
    sort -n "$2" | awk -v p="$1" '{a[NR]=$1} END {i=int((NR*p+99)/100); if (i<1) i=1; printf "%.1f", a[i]*1000}'
}

log "creating $n VMs, $par requests at a time"
t0=$(date +%s.%N)
seq "$n" | xargs -P "$par" -I{} curl -s -o /dev/null --unix-socket "$sock" \
    -w '%{http_code} %{time_total}\n' -X POST http://agent/v1/vms \
    -H 'Content-Type: application/json' \
    -d '{"name":"vm{}","kernel":"irq.elf","memory":64,"cmdline":"wait=0"}' >"$work/create.txt"
t1=$(date +%s.%N)
created=$(grep -c '^201 ' "$work/create.txt" || true)
[ "$created" = "$n" ] || die "only $created of $n creates answered 201: $(sort "$work/create.txt" | cut -d' ' -f1 | uniq -c)"
awk '{print $2}' "$work/create.txt" >"$work/create-s.txt"
running=$(api http://agent/v1/host | grep -o '"running":[0-9]*' | cut -d: -f2)
[ "$running" = "$n" ] || die "$running of $n VMs running"

for _ in $(seq 200); do
    api -o /dev/null -w '%{time_total}\n' http://agent/v1/vms
done >"$work/list-s.txt"
agent_rss=$(awk '/VmRSS/ {print $2}' "/proc/$agent/status")
agent_hwm=$(awk '/VmHWM/ {print $2}' "/proc/$agent/status")
agent_threads=$(awk '/Threads/ {print $2}' "/proc/$agent/status")
states=$(api http://agent/v1/host | { grep -o '"vms":{[^}]*}' || true; })
vm_rss=0
for p in $(pgrep -f "minivmm run .*--pool $pool" || true); do
    vm_rss=$((vm_rss + $(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
done

# The agent killed with SIGKILL while they all run, and started again: it must
# adopt every one of them, and the ledger must still hold every claim.
log "killing the agent (SIGKILL) and starting it again"
kill -KILL "$agent"
wait "$agent" 2>/dev/null || true
claims_after_kill=$("$MINIVMM" pool --pool "$pool" --json allocations | { grep -o '"id"' || true; } | wc -l)
t_adopt0=$(date +%s.%N)
"$MINIVMM" serve --socket "$sock" --state-dir "$work/state" --images "$work/images" \
    --pool "$pool" 2>>"$work/agent.log" &
agent=$!
for _ in $(seq 200); do api -o /dev/null http://agent/v1/host 2>/dev/null && break; sleep 0.02; done
t_adopt1=$(date +%s.%N)
adopted=$(api http://agent/v1/host | grep -o '"running":[0-9]*' | cut -d: -f2)
[ "$adopted" = "$n" ] && [ "$claims_after_kill" = "$n" ] ||
    die "after the agent's SIGKILL: $claims_after_kill claims, $adopted of $n VMs adopted"

log "deleting them"
t2=$(date +%s.%N)
seq "$n" | xargs -P "$par" -I{} curl -s -o /dev/null --unix-socket "$sock" \
    -w '%{http_code}\n' -X DELETE http://agent/v1/vms/vm{} >"$work/delete.txt"
t3=$(date +%s.%N)
deleted=$(grep -c '^204' "$work/delete.txt" || true)
[ "$deleted" = "$n" ] || die "only $deleted of $n deletes answered 204"
left_vms=$(pgrep -fc "minivmm run .*--pool $pool" || true)
left_claims=$("$MINIVMM" pool --pool "$pool" --json allocations | { grep -o '"id"' || true; } | wc -l)
left_dirs=$(find "$work/state/vms" -mindepth 1 -maxdepth 1 | wc -l)
agent_fds=$(find "/proc/$agent/fd" -mindepth 1 | wc -l)
# The VM watcher threads end with their VMs; tokio's idle blocking threads after 10 s.
for _ in $(seq 30); do
    agent_threads_after=$(awk '/Threads/ {print $2}' "/proc/$agent/status")
    [ "$agent_threads_after" -le 2 ] && break
    sleep 0.5
done

echo "VMs                       $n (guest/irq, 1 vCPU, 64 MiB; $par requests at a time)"
echo "create, all               $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}') s"
echo "create-to-running p50/p99 $(pct 50 "$work/create-s.txt") / $(pct 99 "$work/create-s.txt") ms"
echo "GET /v1/vms p50/p99       $(pct 50 "$work/list-s.txt") / $(pct 99 "$work/list-s.txt") ms ($n VMs running)"
echo "VM states then            $states"
echo "agent RSS (peak)          $((agent_rss / 1024)) MiB ($((agent_hwm / 1024)) MiB), $agent_threads threads"
echo "VM process RSS, per VM    $((vm_rss / n)) KiB"
echo "agent SIGKILL + restart   $adopted of $n adopted running, $claims_after_kill claims kept; serving again after $(awk -v a="$t_adopt0" -v b="$t_adopt1" 'BEGIN {printf "%.2f", b - a}') s"
echo "delete, all               $(awk -v a="$t2" -v b="$t3" 'BEGIN {printf "%.2f", b - a}') s"
echo "left after delete         $left_vms VM processes, $left_claims claims, $left_dirs VM directories; agent fds $agent_fds, threads $agent_threads_after"
[ "$left_vms$left_claims$left_dirs" = "000" ] || die "something was left behind"

#!/usr/bin/env bash
# Measures the ledger's durable claim+release throughput and the scheduler's placement
# throughput and decision latency at 1,000 / 10,000 / 100,000 hosts. See BENCHMARKS.md.
#
#   scripts/bench-scheduler.sh            # everything (about 5 minutes on 2 cores)
#   scripts/bench-scheduler.sh --quick    # 1,000 and 10,000 hosts, 20,000 VMs
#
# Knobs (environment): MINIVMM_BENCH_HOSTS, MINIVMM_BENCH_VMS, MINIVMM_BENCH_BATCH,
# MINIVMM_BENCH_STRATEGY, MINIVMM_BENCH_E2E=0, MINIVMM_BENCH_CPU=0, MINIVMM_BENCH_CRITERION=0.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--quick" ]]; then
    export MINIVMM_BENCH_HOSTS="${MINIVMM_BENCH_HOSTS:-1000,10000}"
    export MINIVMM_BENCH_VMS="${MINIVMM_BENCH_VMS:-20000}"
    export MINIVMM_BENCH_CRITERION="${MINIVMM_BENCH_CRITERION:-0}"
fi

echo "== machine: $(nproc) CPUs, load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== ledger: durable claim + release (WAL, synchronous=FULL)"
cargo bench --bench scheduler_ledger
echo "== scheduler: placements committed in batches, decision latency"
cargo bench --bench scheduler

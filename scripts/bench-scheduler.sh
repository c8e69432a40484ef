#!/usr/bin/env bash
# Measures the ledger's durable claim+release throughput and the scheduler's placement
# throughput and decision latency at 1,000 / 10,000 / 100,000 hosts. See BENCHMARKS.md.
#
#   scripts/bench-scheduler.sh            # everything (about 5 minutes on 2 cores)
#   scripts/bench-scheduler.sh --quick    # 1,000 and 10,000 hosts, 20,000 VMs
#   scripts/bench-scheduler.sh --postgres # the same on a PostgreSQL server started here
#
# Knobs (environment): MINIVMM_BENCH_HOSTS, MINIVMM_BENCH_VMS, MINIVMM_BENCH_BATCH,
# MINIVMM_BENCH_STRATEGY, MINIVMM_BENCH_E2E=0, MINIVMM_BENCH_CPU=0, MINIVMM_BENCH_CRITERION=0.
set -euo pipefail
cd "$(dirname "$0")/.."

postgres=""
for arg in "$@"; do
    case "$arg" in
    --quick)
        export MINIVMM_BENCH_HOSTS="${MINIVMM_BENCH_HOSTS:-1000,10000}"
        export MINIVMM_BENCH_VMS="${MINIVMM_BENCH_VMS:-20000}"
        export MINIVMM_BENCH_CRITERION="${MINIVMM_BENCH_CRITERION:-0}"
        ;;
    --postgres) postgres=1 ;;
    *)
        echo "usage: $0 [--quick] [--postgres]" >&2
        exit 2
        ;;
    esac
done

if [ -n "$postgres" ]; then
    # shellcheck source=scripts/pg.sh
    . scripts/pg.sh
    pg_dir="$PWD/target/tmp/bench-pg"
    pg_start "$pg_dir"
    trap 'pg_stop "$pg_dir"' EXIT
    psql -q "$PG_URL" -c "CREATE DATABASE bench"
    export MINIVMM_BENCH_POOL="${PG_URL/\/postgres\?//bench?}"
    echo "== store: PostgreSQL $(psql -tA "$PG_URL" -c 'SHOW server_version'), Unix socket"
    # The decision itself does not touch the store; the ledger benchmark is SQLite's.
    export MINIVMM_BENCH_CPU=0 MINIVMM_BENCH_CRITERION=0
    cargo bench --bench scheduler
    exit
fi

echo "== machine: $(nproc) CPUs, load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== ledger: durable claim + release (WAL, synchronous=FULL)"
cargo bench --bench scheduler_ledger
echo "== scheduler: placements committed in batches, decision latency"
cargo bench --bench scheduler

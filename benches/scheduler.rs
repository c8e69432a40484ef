//! Scheduler throughput and decision latency at 1,000 / 10,000 / 100,000 hosts.
//!
//! Two parts, both run by `cargo bench --bench scheduler` (and scripts/bench-scheduler.sh):
//! 1. End to end: a fresh pool of N hosts of mixed sizes, then 100,000 VMs of mixed
//!    shapes placed through `Scheduler::place_batch` in batches of 256 (one BEGIN
//!    IMMEDIATE transaction and one fsync per batch, WAL, synchronous=FULL). A placement
//!    counts once its batch has committed, so every reported placement is durable.
//!    Prints placements/s and p50/p99 of one decision (index pass + index update).
//! 2. Criterion: one decision (`Scheduler::decide`) on a loaded index, per pool size.
//!
//! 3. Concurrent schedulers: MINIVMM_BENCH_SCHEDULERS threads (default 20), each with its
//!    own connection and index, place the same 100,000 VMs between them; total
//!    placements/s, and a recount of every host proves that none is overcommitted.
//!
//! Environment: MINIVMM_BENCH_HOSTS (default 1000,10000,100000), MINIVMM_BENCH_VMS
//! (100000), MINIVMM_BENCH_BATCH (256), MINIVMM_BENCH_STRATEGY (spread),
//! MINIVMM_BENCH_E2E=0, MINIVMM_BENCH_CPU=0, MINIVMM_BENCH_CRITERION=0 or
//! MINIVMM_BENCH_SCHEDULERS=0 to skip a part. MINIVMM_BENCH_POOL=postgres://... runs
//! every part on that PostgreSQL database instead of an SQLite file (its `minivmm`
//! schema is dropped before each pool is built: give a database of its own).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use minivmm::pool::{Amounts, HostSpec, Ledger};
use minivmm::scheduler::{Request, Scheduler, Weights};

/// A small deterministic generator: the same pool and VMs on every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.next() as usize % xs.len()]
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Where the benchmark's pool is: `$MINIVMM_BENCH_POOL` (a PostgreSQL URL), else a
/// file in `dir`.
fn pool_location(dir: &std::path::Path) -> PathBuf {
    match std::env::var("MINIVMM_BENCH_POOL") {
        Ok(url) if !url.is_empty() => PathBuf::from(url),
        _ => dir.join("pool.db"),
    }
}

/// Empties the PostgreSQL pool, if the benchmark uses one.
fn drop_postgres_pool() {
    if let Ok(url) = std::env::var("MINIVMM_BENCH_POOL")
        && !url.is_empty()
    {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        c.batch_execute("DROP SCHEMA IF EXISTS minivmm CASCADE")
            .expect("drop schema");
    }
}

/// A fresh pool with `n` hosts of mixed sizes, costs and zones.
fn build_pool(n: usize) -> (PathBuf, Ledger) {
    let dir = std::env::temp_dir().join(format!("minivmm-bench-sched-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    drop_postgres_pool();
    let ledger = Ledger::open(Some(&pool_location(&dir))).expect("open pool");
    let mut rng = Lcg(n as u64);
    let specs: Vec<HostSpec> = (0..n)
        .map(|i| {
            let mut s = HostSpec::new(
                &format!("host-{i:06}"),
                rng.pick(&[32, 64, 96, 128]),
                rng.pick(&[64, 128, 256, 512]) * 1024,
                rng.pick(&[500, 1000, 2000]),
            );
            s.cost = rng.pick(&[1.0, 1.5, 2.0, 2.5, 3.0]);
            s.labels
                .insert("zone".into(), rng.pick(&["a", "b", "c"]).into());
            s
        })
        .collect();
    ledger.store().add_hosts(&specs).expect("add hosts");
    (dir, ledger)
}

/// `count` VMs of mixed shapes; 5% require zone=a, 5% are in one of 1,000 anti-affinity groups.
fn vms(count: usize, weights: Weights) -> Vec<Request> {
    let mut rng = Lcg(7);
    (0..count)
        .map(|i| {
            let amounts = Amounts::new(
                rng.pick(&[1, 1, 2, 4]),
                rng.pick(&[256, 512, 1024, 2048, 4096]),
                rng.pick(&[0, 0, 10, 20]),
            );
            let mut r = Request::new(&format!("vm-{i}"), amounts).with_weights(weights);
            match rng.next() % 20 {
                0 => r.labels.push(("zone".into(), "a".into())),
                1 => r.group = Some(format!("g{}", rng.next() % 1000)),
                _ => {}
            }
            r
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Part 1: place every VM, committed in batches; print one line of figures.
fn end_to_end(hosts: usize, count: usize, batch: usize, weights: Weights) {
    let started = Instant::now();
    let (dir, ledger) = build_pool(hosts);
    let built = started.elapsed();
    let mut sched = Scheduler::new(ledger);
    let loading = Instant::now();
    sched.refresh().expect("load index");
    let loaded = loading.elapsed();
    let reqs = vms(count, weights);
    sched.record_timings();
    let (mut placed, mut refused) = (0usize, 0usize);
    let run = Instant::now();
    for chunk in reqs.chunks(batch) {
        for r in sched.place_batch(chunk, false).expect("batch") {
            match r {
                Ok(_) => placed += 1,
                Err(_) => refused += 1,
            }
        }
    }
    let wall = run.elapsed();
    let mut t = sched.take_timings();
    t.sort();
    println!(
        "| {hosts:>7} | {count:>7} | {batch:>5} | {placed:>7} | {refused:>6} | {:>9.0} | {:>8.1} | {:>8.1} | {:>8.1} | {:>6.2} | {:>6.2} |",
        placed as f64 / wall.as_secs_f64(),
        wall.as_secs_f64() * 1e6 / count as f64,
        percentile(&t, 0.5).as_secs_f64() * 1e6,
        percentile(&t, 0.99).as_secs_f64() * 1e6,
        built.as_secs_f64(),
        loaded.as_secs_f64(),
    );
    drop(sched);
    let _ = std::fs::remove_dir_all(dir);
}

/// Part 3: `schedulers` threads, each with its own connection and index, place `count`
/// VMs between them; prints total placements/s and checks that no host is overcommitted.
fn concurrent(hosts: usize, count: usize, batch: usize, schedulers: usize, weights: Weights) {
    let (dir, ledger) = build_pool(hosts);
    let location = pool_location(&dir);
    let reqs = vms(count, weights);
    let per = count.div_ceil(schedulers);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(schedulers + 1));
    let threads: Vec<_> = reqs
        .chunks(per)
        .map(|mine| {
            let (mine, location, barrier) = (mine.to_vec(), location.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut sched = Scheduler::new(Ledger::open(Some(&location)).expect("open"));
                sched.refresh().expect("load index");
                barrier.wait();
                let (mut placed, mut refused, mut retried) = (0usize, 0usize, 0usize);
                for chunk in mine.chunks(batch) {
                    // A lock wait past its limit fails the whole batch: try it again.
                    let results = loop {
                        match sched.place_batch(chunk, false) {
                            Ok(r) => break r,
                            Err(e) => {
                                retried += 1;
                                assert!(retried < 100, "batch keeps failing: {e}");
                            }
                        }
                    };
                    for r in results {
                        match r {
                            Ok(_) => placed += 1,
                            Err(_) => refused += 1,
                        }
                    }
                }
                (placed, refused, retried)
            })
        })
        .collect();
    barrier.wait();
    let run = Instant::now();
    let (mut placed, mut refused, mut retried) = (0, 0, 0);
    for t in threads {
        let (p, r, x) = t.join().expect("scheduler thread");
        placed += p;
        refused += r;
        retried += x;
    }
    let wall = run.elapsed();
    let mut store = ledger.store();
    let truth = store.recount().expect("recount");
    let mut overcommitted = 0;
    for h in store.hosts().expect("hosts") {
        let (sum, vms) = truth[&h.spec.name];
        assert_eq!(
            (h.used, h.vms),
            (sum, vms),
            "host {} usage drifted",
            h.spec.name
        );
        if minivmm::pool::Resource::ALL
            .iter()
            .any(|&r| h.used.get(r) > h.usable(r))
        {
            overcommitted += 1;
        }
    }
    println!(
        "| {hosts:>7} | {schedulers:>10} | {count:>7} | {placed:>7} | {refused:>6} | {retried:>7} | {:>9.0} | {overcommitted:>13} |",
        placed as f64 / wall.as_secs_f64()
    );
    assert_eq!(overcommitted, 0, "a host is overcommitted");
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

/// CPU time of this thread (user + system): immune to other processes on a busy machine.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The three single weighers, by name.
const STRATEGIES: [(&str, Weights); 3] = [
    ("spread", Weights::SPREAD),
    ("pack", Weights::PACK),
    ("cost", Weights::COST),
];

/// A pool of `n` hosts and a scheduler whose index is already loaded.
fn loaded_scheduler(n: usize) -> (PathBuf, Scheduler) {
    let (dir, ledger) = build_pool(n);
    let mut sched = Scheduler::new(ledger);
    sched.refresh().expect("load index");
    (dir, sched)
}

/// Mean CPU time of one decision per strategy, simple requests and with labels/groups.
fn decision_cpu(sizes: &[usize]) {
    println!("| hosts   | strategy | simple µs (CPU) | label/group µs (CPU) |");
    println!("|---------|----------|-----------------|----------------------|");
    for &n in sizes {
        let (dir, mut sched) = loaded_scheduler(n);
        for (name, w) in STRATEGIES {
            let all = vms(2000, w);
            let (simple, special): (Vec<_>, Vec<_>) = all
                .into_iter()
                .partition(|r| r.labels.is_empty() && r.group.is_none());
            let mut mean = |reqs: &[Request]| {
                let t = thread_cpu();
                for r in reqs {
                    std::hint::black_box(sched.decide(r));
                }
                (thread_cpu() - t).as_secs_f64() * 1e6 / reqs.len().max(1) as f64
            };
            println!(
                "| {n:>7} | {name:>8} | {:>15.1} | {:>20.1} |",
                mean(&simple),
                mean(&special)
            );
        }
        drop(sched);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Part 2: criterion measures one decision on a loaded index.
fn decision(c: &mut Criterion, sizes: &[usize]) {
    let mut g = c.benchmark_group("decision");
    let reqs = vms(1000, Weights::SPREAD);
    for &n in sizes {
        let (dir, mut sched) = loaded_scheduler(n);
        for (name, w) in STRATEGIES {
            let reqs: Vec<Request> = reqs.iter().cloned().map(|r| r.with_weights(w)).collect();
            let mut i = 0;
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    i = (i + 1) % reqs.len();
                    sched.decide(&reqs[i]).map(|(_, s)| s.total)
                })
            });
        }
        drop(sched);
        let _ = std::fs::remove_dir_all(dir);
    }
    g.finish();
}

fn main() {
    let sizes: Vec<usize> = env_or("MINIVMM_BENCH_HOSTS", "1000,10000,100000")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let count: usize = env_or("MINIVMM_BENCH_VMS", "100000")
        .parse()
        .expect("MINIVMM_BENCH_VMS");
    let batch: usize = env_or("MINIVMM_BENCH_BATCH", "256")
        .parse()
        .expect("MINIVMM_BENCH_BATCH");
    let weights = Weights::parse(&env_or("MINIVMM_BENCH_STRATEGY", "spread")).expect("strategy");
    if env_or("MINIVMM_BENCH_E2E", "1") != "0" {
        println!(
            "| hosts   | VMs     | batch | placed  | no fit | placed/s  | µs/VM    | p50 µs   | p99 µs   | build s | load s |"
        );
        println!(
            "|---------|---------|-------|---------|--------|-----------|----------|----------|----------|--------|--------|"
        );
        for &n in &sizes {
            end_to_end(n, count, batch.max(1), weights);
        }
    }
    let schedulers: usize = env_or("MINIVMM_BENCH_SCHEDULERS", "20")
        .parse()
        .expect("MINIVMM_BENCH_SCHEDULERS");
    if schedulers > 0 {
        println!(
            "| hosts   | schedulers | VMs     | placed  | no fit | retried | placed/s  | overcommitted |"
        );
        println!(
            "|---------|------------|---------|---------|--------|---------|-----------|---------------|"
        );
        for &n in &sizes {
            concurrent(n, count, batch.max(1), schedulers, weights);
        }
    }
    if env_or("MINIVMM_BENCH_CPU", "1") != "0" {
        decision_cpu(&sizes);
    }
    if env_or("MINIVMM_BENCH_CRITERION", "1") != "0" {
        let mut c = Criterion::default()
            .sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .configure_from_args();
        decision(&mut c, &sizes);
        c.final_summary();
    }
}

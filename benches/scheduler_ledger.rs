//! Durable claim + release throughput of the ledger (WAL, synchronous=FULL): each
//! iteration is two committed transactions, each waiting for its fsync.
//!
//! Run: `cargo bench --bench scheduler_ledger` (or scripts/bench-scheduler.sh).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use minivmm::pool::{Amounts, HostSpec, Ledger};

fn claim_release(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("minivmm-bench-ledger-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ledger = Ledger::open(Some(&dir.join("pool.db"))).expect("open pool");
    ledger
        .add_host(&HostSpec::new("bench", 1 << 20, 1 << 30, 1 << 20))
        .expect("add host");
    let mut g = c.benchmark_group("ledger");
    g.throughput(Throughput::Elements(1));
    g.bench_function("claim_on+release", |b| {
        b.iter(|| {
            let a = ledger
                .claim_on("bench", "vm", Amounts::new(1, 512, 1), None)
                .expect("claim");
            ledger.release(a.id).expect("release");
        })
    });
    g.bench_function("claim_local+drop", |b| {
        b.iter(|| drop(ledger.claim_local("vm", 1, 512, 0).expect("claim")))
    });
    // What `minivmm run` does in all: open the pool, claim for this process, release
    // at the end, close (the other connection above keeps the pool open, as other
    // processes would).
    // `run` relaxes durability (Ledger::relax_durability); "synchronous=FULL" is how
    // it was before, for comparison.
    let path = dir.join("pool.db");
    for (name, relax) in [
        ("run: open+claim_local+release+close", true),
        (
            "run, synchronous=FULL: open+claim_local+release+close",
            false,
        ),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let l = Ledger::open(Some(&path)).expect("open");
                if relax {
                    l.relax_durability().expect("relax");
                }
                drop(l.claim_local("vm", 1, 512, 0).expect("claim"));
            })
        });
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(5));
    targets = claim_release
}
criterion_main!(benches);

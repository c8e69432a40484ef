//! Concurrent schedulers, in threads and in processes, never overcommit.

mod pool_util;

use std::process::Stdio;
use std::sync::{Arc, Barrier};

use minivmm::pool::{Amounts, HostSpec, Ledger, Resource};
use minivmm::scheduler::{Request, ScheduleError, Scheduler, Weights};
use pool_util::{Backend, Scratch};

/// Usage equals the allocations' sums and stays within usable on every host.
fn assert_no_overcommit(ledger: &Ledger) -> u64 {
    let mut store = ledger.store();
    let truth = store.recount().expect("recount");
    let mut vms = 0;
    for h in store.hosts().expect("hosts") {
        assert_eq!(
            h.used, truth[&h.spec.name].0,
            "usage of {} drifted",
            h.spec.name
        );
        for r in Resource::ALL {
            assert!(
                h.used.get(r) <= h.usable(r),
                "{} overcommitted on {r}",
                h.spec.name
            );
        }
        vms += h.vms;
    }
    vms
}

fn scheduler_threads_never_overcommit(b: Backend) {
    let s = Scratch::with("sched-threads", b);
    let ledger = Ledger::open(Some(&s.pool())).expect("open");
    // 4 hosts × 4 vCPUs × ratio 4 = 64 slots of one vCPU.
    for name in ["h1", "h2", "h3", "h4"] {
        ledger
            .add_host(&HostSpec::new(name, 4, 1 << 20, 100))
            .expect("add");
    }
    let threads = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (path, barrier) = (s.pool(), barrier.clone());
            std::thread::spawn(move || {
                let mut sched = Scheduler::new(Ledger::open(Some(&path)).expect("open"));
                let strategy = [Weights::SPREAD, Weights::PACK, Weights::COST][t % 3];
                barrier.wait();
                let mut placed = 0u64;
                for i in 0..12 {
                    let r = Request::new(&format!("t{t}-{i}"), Amounts::new(1, 64, 0))
                        .with_weights(strategy);
                    match sched.place(&r) {
                        Ok(_) => placed += 1,
                        Err(ScheduleError::NoHost(_)) => {}
                        Err(e) => panic!("unexpected {e}"),
                    }
                }
                placed
            })
        })
        .collect();
    let placed: u64 = handles.into_iter().map(|h| h.join().expect("thread")).sum();
    assert_eq!(placed, 64, "96 requests race for 64 slots");
    assert_eq!(assert_no_overcommit(&ledger), 64);
}

fn scheduler_processes_never_overcommit(b: Backend) {
    let s = Scratch::with("sched-procs", b);
    let pool = s.pool();
    for (name, vcpus) in [("p1", "1"), ("p2", "1"), ("p3", "1")] {
        pool_util::ok(
            &pool,
            &[
                "pool", "add-host", name, "--vcpus", vcpus, "--memory", "64G", "--disk", "10",
            ],
        );
    }
    // 3 hosts × 4 slots of one vCPU; 20 processes race, with different strategies.
    let children: Vec<_> = (0..20)
        .map(|i| {
            pool_util::minivmm(&pool, "schedule")
                .args([
                    "--vcpus",
                    "1",
                    "--memory",
                    "256",
                    "--name",
                    &format!("v{i}"),
                ])
                .args(["--strategy", ["spread", "pack", "cost"][i % 3]])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let mut placed = 0;
    for c in children {
        let out = c.wait_with_output().expect("wait");
        if out.status.success() {
            placed += 1;
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("no host fits: 3 lack vcpus (need 1, most free 0)"),
                "{err}"
            );
        }
    }
    assert_eq!(placed, 12);
    let ledger = Ledger::open(Some(&pool)).expect("open");
    assert_eq!(assert_no_overcommit(&ledger), 12);
    assert_eq!(ledger.store().allocations().expect("allocs").len(), 12);
}

crate::conformance!(
    scheduler_threads_never_overcommit,
    scheduler_processes_never_overcommit,
);

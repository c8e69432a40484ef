//! kill -9 at any moment during claims and placements leaves the ledger consistent: every allocation is
//! whole or absent, none that was reported is lost, and dead holders are collected.

mod pool_util;

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use minivmm::pool::{Amounts, Ledger, Resource};
use pool_util::{Scratch, ok};

#[test]
fn kill_9_in_a_loop_during_claims() {
    let s = Scratch::new("crash");
    let pool = s.pool();
    ok(
        &pool,
        &[
            "pool", "add-host", "h", "--vcpus", "100", "--memory", "64G", "--disk", "10",
        ],
    );
    ok(
        &pool,
        &[
            "pool", "add-host", "g", "--vcpus", "100", "--memory", "64G", "--disk", "10",
        ],
    );

    // Background churn in this process keeps the write lock busy while children die.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (stop, path) = (stop.clone(), pool.clone());
        std::thread::spawn(move || {
            let ledger = Ledger::open(Some(&path)).expect("open");
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let a = ledger
                    .claim_on("g", "churn", Amounts::new(1, 1, 0), None)
                    .expect("claim");
                ledger.release(a.id).expect("release");
                std::thread::sleep(Duration::from_millis(1));
                n += 1;
            }
            n
        })
    };

    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut reported = Vec::new();
    for i in 0..60 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_micros((seed >> 33) % 60_000);
        let host = if i % 3 == 0 { "g" } else { "h" };
        // Plain claims, claims held by the process, and scheduler placements.
        let mut cmd = if i % 5 == 4 {
            let mut c = pool_util::minivmm(&pool, "schedule");
            c.args(["--vcpus", "1", "--memory", "1", "--name"]);
            c
        } else {
            let mut c = pool_util::minivmm(&pool, "pool");
            c.args(["claim", host, "--vcpus", "1", "--memory", "1", "--name"]);
            if i % 2 == 0 {
                c.arg("--hold");
            }
            c
        };
        cmd.arg(format!("k{i}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn");
        std::thread::sleep(delay);
        let _ = child.kill();
        child.wait().expect("reap");
        let mut out = String::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read");
        // "allocation 7 on h" from pool claim, "placed VM k4 on host h (allocation 7, ..."
        // from schedule.
        let id = out
            .strip_prefix("allocation ")
            .or_else(|| out.split("(allocation ").nth(1))
            .and_then(|r| r.split([' ', ',']).next());
        if let Some(id) = id {
            let held = i % 5 != 4 && i % 2 == 0;
            reported.push((id.parse::<i64>().expect("id"), held));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // The delays span a claim's whole life: some children must have got theirs.
    assert!(
        reported.len() >= 5,
        "only {} claims completed",
        reported.len()
    );
    let churned = churn.join().expect("churn thread");
    assert!(churned > 0);

    let ledger = Ledger::open(Some(&pool)).expect("open");
    {
        let store = rusqlite::Connection::open(&pool).expect("sqlite");
        let check: String = store
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("check");
        assert_eq!(check, "ok");
    }
    let live: Vec<i64> = ledger
        .store()
        .allocations()
        .expect("allocs")
        .iter()
        .map(|a| a.id)
        .collect();
    for (id, held) in &reported {
        // A claim that was reported is durable; a holder's may already be collected by
        // a later claim that found it dead, but a plain claim's never disappears.
        assert!(
            *held || live.contains(id),
            "reported allocation {id} was lost"
        );
    }
    // Every holder is dead now: gc leaves only plain claims, and the books balance.
    ledger.gc().expect("gc");
    let mut store = ledger.store();
    for a in store.allocations().expect("allocs") {
        assert!(
            a.owner.is_none(),
            "dead holder's allocation {} survived gc",
            a.id
        );
        assert_eq!(
            a.amounts,
            Amounts::new(1, 1, 0),
            "allocation {} is not whole",
            a.id
        );
    }
    let truth = store.recount().expect("recount");
    for h in store.hosts().expect("hosts") {
        assert_eq!(
            h.used, truth[&h.spec.name].0,
            "usage of {} drifted",
            h.spec.name
        );
        assert_eq!(h.vms, truth[&h.spec.name].1);
        assert!(h.used.get(Resource::Vcpus) <= h.usable(Resource::Vcpus));
    }
    eprintln!(
        "{} claims reported before kill -9, {churned} churn claims, {} plain claims left",
        reported.len(),
        store.allocations().expect("allocs").len()
    );
}

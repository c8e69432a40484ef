//! The ledger's promises: no overcommit under concurrent claimers, bad input changes
//! nothing, stale owners are released, admission for `run` names what is missing.

mod pool_util;

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Barrier};

use minivmm::pool::{Amounts, HostSpec, Ledger, Owner, PoolError, Resource, owner};
use pool_util::{Backend, Scratch, fails, ok, run, snapshot};

/// A host with `vcpus` × 4 usable vCPUs and plenty of memory.
fn small_host(ledger: &Ledger, name: &str, vcpus: u64) {
    ledger
        .add_host(&HostSpec::new(name, vcpus, 1 << 20, 100))
        .expect("add host");
}

/// Every host's denormalised usage equals the sum of its allocations.
fn assert_consistent(ledger: &Ledger) {
    let mut store = ledger.store();
    let truth = store.recount().expect("recount");
    for h in store.hosts().expect("hosts") {
        let (sum, count) = truth[&h.spec.name];
        assert_eq!(h.used, sum, "host {} usage drifted", h.spec.name);
        assert_eq!(h.vms, count, "host {} VM count drifted", h.spec.name);
        for r in Resource::ALL {
            assert!(
                h.used.get(r) <= h.usable(r),
                "host {} overcommitted {r}",
                h.spec.name
            );
        }
    }
}

fn concurrent_threads_never_exceed_usable(b: Backend) {
    let s = Scratch::with("threads", b);
    let ledger = Ledger::open(Some(&s.pool())).expect("open");
    small_host(&ledger, "tiny", 3); // 12 usable vCPUs
    let threads = 32;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let path = s.pool();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                // Each thread has its own connection, as separate processes would.
                let ledger = Ledger::open(Some(&path)).expect("open");
                barrier.wait();
                let mut granted = 0;
                for j in 0..4 {
                    match ledger.claim_on(
                        "tiny",
                        &format!("vm{i}-{j}"),
                        Amounts::new(1, 64, 0),
                        None,
                    ) {
                        Ok(_) => granted += 1,
                        Err(PoolError::Insufficient { resource, .. }) => {
                            assert_eq!(resource, Resource::Vcpus)
                        }
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
                granted
            })
        })
        .collect();
    let granted: u64 = handles.into_iter().map(|h| h.join().expect("thread")).sum();
    assert_eq!(granted, 12, "exactly the usable vCPUs are granted");
    assert_eq!(ledger.store().allocations().expect("allocs").len(), 12);
    assert_consistent(&ledger);
}

fn concurrent_processes_never_exceed_usable(b: Backend) {
    let s = Scratch::with("procs", b);
    let pool = s.pool();
    ok(
        &pool,
        &[
            "pool", "add-host", "tiny", "--vcpus", "2", "--memory", "4G", "--disk", "10",
        ],
    );
    // 2 vCPUs × ratio 4 = 8 usable; 24 processes race for one each.
    let children: Vec<_> = (0..24)
        .map(|i| {
            pool_util::minivmm(&pool, "pool")
                .args(["claim", "tiny", "--vcpus", "1", "--memory", "100"])
                .args(["--name", &format!("p{i}")])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let mut granted = 0;
    for c in children {
        let out = c.wait_with_output().expect("wait");
        if out.status.success() {
            granted += 1;
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("lacks vcpus: asked 1, free 0"), "{err}");
        }
    }
    assert_eq!(granted, 8);
    let ledger = Ledger::open(Some(&pool)).expect("open");
    assert_eq!(ledger.store().allocations().expect("allocs").len(), 8);
    assert_consistent(&ledger);
}

fn bad_input_changes_nothing(b: Backend) {
    let s = Scratch::with("bad", b);
    let pool = s.pool();
    ok(
        &pool,
        &[
            "pool", "add-host", "h1", "--vcpus", "4", "--memory", "8G", "--disk", "50",
        ],
    );
    ok(
        &pool,
        &["pool", "claim", "h1", "--vcpus", "2", "--memory", "1G"],
    );
    let before = snapshot(&pool);
    let add = [
        "pool", "add-host", "h2", "--vcpus", "4", "--memory", "8G", "--disk", "50",
    ];
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--vcpus", "0"],
            "vcpus: total must be greater than zero",
        ),
        (vec!["--memory", "0"], "must be greater than zero"),
        (vec!["--memory", "-4G"], "must be greater than zero"),
        (vec!["--disk", "1.5"], "whole number of GiB"),
        (
            vec!["--cpu-ratio", "0"],
            "cpu ratio must be a number above 0",
        ),
        (
            vec!["--mem-ratio", "-1"],
            "memory ratio must be a number above 0",
        ),
        (
            vec!["--reserved-vcpus", "5"],
            "reserved 5 is more than total 4",
        ),
        (vec!["--reserved-memory", "9G"], "is more than total"),
        (vec!["--cost", "0"], "cost must be a number above 0"),
        (vec!["--label", "novalue"], "must look like key=value"),
        (vec!["--limit", "vcpus=4:2:1"], "min 4 is above max 2"),
    ];
    for (extra, want) in cases {
        // Replace the flag's value if the base command has it, else append it.
        let mut args = add.to_vec();
        match args.iter().position(|a| *a == extra[0]) {
            Some(i) => args[i + 1] = extra[1],
            None => args.extend(extra),
        }
        let err = fails(&pool, &args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let err = fails(
        &pool,
        &[
            "pool", "add-host", "h1", "--vcpus", "4", "--memory", "8G", "--disk", "5",
        ],
    );
    assert!(err.contains("already in the pool"), "{err}");
    for (args, want) in [
        (
            vec!["pool", "set-host", "nope", "--cost", "2"],
            "no host named nope",
        ),
        (
            vec!["pool", "set-host", "h1", "--vcpus", "0"],
            "greater than zero",
        ),
        (
            vec!["pool", "set-host", "h1", "--cpu-ratio", "0.1"],
            "is in use, more than the new usable",
        ),
        (
            vec!["pool", "set-host", "h1", "--unlabel", "zone"],
            "has no label",
        ),
        (vec!["pool", "remove-host", "h1"], "holds 1 allocation"),
        (vec!["pool", "remove-host", "nope"], "no host named nope"),
        (vec!["pool", "release", "99"], "no allocation with id 99"),
        (
            vec!["pool", "claim", "h1", "--vcpus", "0", "--memory", "1G"],
            "vcpus must be at least 1",
        ),
        (
            vec!["pool", "claim", "h1", "--vcpus", "15", "--memory", "1G"],
            "lacks vcpus: asked 15, free 14",
        ),
        (
            vec!["pool", "claim", "h1", "--vcpus", "1", "--memory", "9G"],
            "lacks memory: asked 9216 MiB, free 7168 MiB",
        ),
        (
            vec!["pool", "claim", "nope", "--vcpus", "1", "--memory", "1G"],
            "no host named nope",
        ),
    ] {
        let err = fails(&pool, &args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(
        snapshot(&pool),
        before,
        "a refused command changed the pool"
    );
}

#[test]
fn foreign_corrupt_and_newer_files_are_refused_untouched() {
    let s = Scratch::new("foreign");
    let garbage = s.dir.join("garbage.db");
    std::fs::write(
        &garbage,
        b"this is not a database at all, not even close....",
    )
    .expect("write");
    let err = fails(&garbage, &["pool", "list"]);
    assert!(
        err.contains("is not a minivmm pool: the file is not an SQLite database"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&garbage).expect("read"),
        b"this is not a database at all, not even close...."
    );

    let foreign = s.dir.join("foreign.db");
    {
        let c = rusqlite::Connection::open(&foreign).expect("sqlite");
        c.execute_batch("CREATE TABLE notes(x); INSERT INTO notes VALUES (1);")
            .expect("schema");
    }
    let err = fails(&foreign, &["pool", "list"]);
    assert!(err.contains("SQLite database of another program"), "{err}");

    let newer = s.pool();
    ok(&newer, &["pool", "list"]);
    {
        let c = rusqlite::Connection::open(&newer).expect("sqlite");
        c.pragma_update(None, "user_version", 99).expect("bump");
    }
    let err = fails(&newer, &["pool", "list"]);
    assert!(
        err.contains("schema version 99; this minivmm knows up to 1"),
        "{err}"
    );

    let dir_err = fails(&s.dir, &["pool", "list"]);
    assert!(dir_err.contains("it is a directory"), "{dir_err}");
}

#[test]
fn pool_file_has_wal_and_identity() {
    let s = Scratch::new("wal");
    let _ledger = Ledger::open(Some(&s.pool())).expect("open");
    let c = rusqlite::Connection::open(s.pool()).expect("sqlite");
    let mode: String = c
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .expect("mode");
    assert_eq!(mode, "wal");
    let app: i64 = c
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .expect("app");
    assert_eq!(app, 0x4d56_4d4d);
    let v: i64 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(v, 1);
}

/// Spawns `pool claim --hold` and waits until it holds its allocation.
fn hold(pool: &Path, host: &str, vcpus: &str) -> std::process::Child {
    use std::io::BufRead;
    let mut child = pool_util::minivmm(pool, "pool")
        .args(["claim", host, "--vcpus", vcpus, "--memory", "64", "--hold"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read");
    assert!(line.starts_with("allocation "), "holder said {line:?}");
    child
}

fn sigkilled_holder_is_released_by_next_claim_and_gc(b: Backend) {
    let s = Scratch::with("stale", b);
    let pool = s.pool();
    ok(
        &pool,
        &[
            "pool", "add-host", "h", "--vcpus", "1", "--memory", "1G", "--disk", "1",
        ],
    );
    let mut a = hold(&pool, "h", "4");
    // Full: another claim is refused while the holder lives.
    let err = fails(
        &pool,
        &["pool", "claim", "h", "--vcpus", "1", "--memory", "64"],
    );
    assert!(err.contains("lacks vcpus"), "{err}");
    a.kill().expect("kill -9");
    a.wait().expect("reap");
    // The next claim finds the holder gone and takes its place.
    let next = ok(
        &pool,
        &[
            "pool", "claim", "h", "--vcpus", "4", "--memory", "64", "--name", "next",
        ],
    );
    // "allocation 2 on h"
    let id = next
        .strip_prefix("allocation ")
        .and_then(|r| r.split(' ').next())
        .filter(|id| id.parse::<i64>().is_ok())
        .unwrap_or_else(|| panic!("claim printed {next:?}"));
    let allocs = ok(&pool, &["pool", "allocations"]);
    assert!(
        allocs.contains("next") && !allocs.contains("pid "),
        "{allocs}"
    );
    let out = ok(&pool, &["pool", "release", id]);
    assert!(
        out.contains("next"),
        "release {id} freed another VM's claim: {out}"
    );
    assert_eq!(ok(&pool, &["pool", "--json", "allocations"]).trim(), "[]");

    let mut b = hold(&pool, "h", "2");
    let mut c = hold(&pool, "h", "2");
    b.kill().expect("kill");
    b.wait().expect("reap");
    let out = ok(&pool, &["pool", "gc"]);
    assert!(out.contains("released 1 stale allocation"), "{out}");
    c.kill().expect("kill");
    c.wait().expect("reap");
    let out = ok(&pool, &["pool", "gc"]);
    assert!(out.contains("released 1 stale allocation"), "{out}");
    assert_eq!(ok(&pool, &["pool", "--json", "allocations"]).trim(), "[]");
}

fn reused_pid_and_other_boot_are_stale_other_machines_are_not(b: Backend) {
    let s = Scratch::with("reuse", b);
    let ledger = Ledger::open(Some(&s.pool())).expect("open");
    small_host(&ledger, "h", 4);
    let me = owner::current().expect("me");
    let reused = Owner {
        start_time: me.start_time + 1,
        ..me.clone()
    };
    let rebooted = Owner {
        boot_id: "00000000-old-boot".into(),
        ..me.clone()
    };
    let remote = Owner {
        host: "elsewhere".into(),
        pid: 1,
        ..me.clone()
    };
    let names = |ledger: &Ledger| -> Vec<String> {
        let allocs = ledger.store().allocations().expect("allocs");
        allocs.into_iter().map(|a| a.vm_name).collect()
    };
    let claim = |name: &str, o: &Owner| {
        ledger
            .claim_on("h", name, Amounts::new(1, 1, 0), Some(o.clone()))
            .expect("claim");
    };
    claim("remote", &remote);
    claim("me", &me);
    claim("reused", &reused);
    assert_eq!(names(&ledger), ["remote", "me", "reused"]);
    // The next claim releases the stale one before it looks at capacity.
    claim("rebooted", &rebooted);
    assert_eq!(names(&ledger), ["remote", "me", "rebooted"]);
    let released: Vec<String> = ledger
        .gc()
        .expect("gc")
        .into_iter()
        .map(|a| a.vm_name)
        .collect();
    assert_eq!(released, ["rebooted"]);
    assert_eq!(names(&ledger), ["remote", "me"]);
    assert_consistent(&ledger);
}

fn claim_local_names_the_missing_resource_and_releases_on_drop(b: Backend) {
    fn is_send<T: Send>(_: &T) {}
    let s = Scratch::with("local", b);
    let ledger = Ledger::open(Some(&s.pool())).expect("open");
    let claim = ledger.claim_local("guest", 1, 16, 0).expect("claim");
    is_send(&claim);
    let host = owner::hostname().expect("hostname");
    let allocs = ledger.store().allocations().expect("allocs");
    assert_eq!(allocs.len(), 1);
    assert_eq!(allocs[0].host, host);
    assert_eq!(allocs[0].id, claim.id());
    let usable_mem = ledger
        .store()
        .host(&host)
        .expect("host")
        .usable(Resource::MemoryMib);
    match ledger.claim_local("huge", 1, usable_mem + 1, 0) {
        Err(e @ PoolError::Insufficient { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("lacks memory"), "{msg}");
            assert!(
                msg.contains(&format!("asked {} MiB", usable_mem + 1)),
                "{msg}"
            );
            assert!(
                msg.contains(&format!("free {} MiB", usable_mem - 16)),
                "{msg}"
            );
        }
        other => panic!("expected Insufficient, got {:?}", other.map(|c| c.id())),
    }
    drop(claim);
    assert!(ledger.store().allocations().expect("allocs").is_empty());
    let explicit = ledger.claim_local("guest2", 1, 16, 0).expect("claim");
    explicit.release().expect("release");
    assert!(ledger.store().allocations().expect("allocs").is_empty());
    // A second open of the same pool does not register the host twice.
    let (_, added) = Ledger::open(Some(&s.pool()))
        .expect("open")
        .init_local()
        .expect("init");
    assert!(!added);
}

fn remove_force_and_json_output(b: Backend) {
    let s = Scratch::with("remove", b);
    let pool = s.pool();
    ok(
        &pool,
        &[
            "pool", "add-host", "h", "--vcpus", "2", "--memory", "2G", "--disk", "5", "--label",
            "zone=a",
        ],
    );
    ok(
        &pool,
        &["pool", "claim", "h", "--vcpus", "1", "--memory", "1G"],
    );
    let status: serde_json::Value =
        serde_json::from_str(&ok(&pool, &["pool", "--json", "status"])).expect("json");
    let vcpus = &status[0]["resources"][0];
    assert_eq!(vcpus["used"], 1);
    assert_eq!(vcpus["usable"], 8);
    // M = R·T/C = 7 free × 24 h ÷ 1.
    assert_eq!(vcpus["management_index"], 168.0);
    let out = ok(&pool, &["pool", "remove-host", "h", "--force"]);
    assert!(out.contains("1 allocation(s) released"), "{out}");
    assert_eq!(ok(&pool, &["pool", "--json", "list"]).trim(), "[]");
    assert!(run(&pool, &["pool", "list"]).status.success());
}

fn first_use_from_many_threads_registers_the_local_host_once(b: Backend) {
    let s = Scratch::with("firstuse", b);
    let barrier = Arc::new(Barrier::new(6));
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let (path, barrier) = (s.pool(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                // Every thread opens the not-yet-existing pool and claims at once.
                let ledger = Ledger::open(Some(&path)).expect("open");
                let claim = ledger
                    .claim_local(&format!("vm{i}"), 1, 16, 0)
                    .expect("claim");
                claim.id()
            })
        })
        .collect();
    let mut ids: Vec<i64> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6);
    let ledger = Ledger::open(Some(&s.pool())).expect("open");
    assert_eq!(ledger.store().hosts().expect("hosts").len(), 1);
    // Every claim was dropped with its thread.
    assert!(ledger.store().allocations().expect("allocs").is_empty());
}

/// A connection that skips waiting for the disk (what `run` uses) still commits each
/// claim and release before returning: another connection sees them at once. (A
/// SIGKILLed `run` leaving its claim to `gc`: tests/admission.rs.)
fn relaxed_claims_are_committed_at_once(b: Backend) {
    let s = Scratch::with("relaxed", b);
    let run = Ledger::open(Some(&s.pool())).expect("open");
    run.relax_durability().expect("relax");
    let other = Ledger::open(Some(&s.pool())).expect("open");
    let claim = run.claim_local("vm", 1, 16, 0).expect("claim");
    let seen = other.store().allocations().expect("allocations");
    assert_eq!(seen.len(), 1);
    assert!(seen[0].is_same_claim(claim.allocation()));
    claim.release().expect("release");
    assert!(other.store().allocations().expect("allocations").is_empty());
    assert_consistent(&other);
}

crate::conformance!(
    relaxed_claims_are_committed_at_once,
    concurrent_threads_never_exceed_usable,
    concurrent_processes_never_exceed_usable,
    bad_input_changes_nothing,
    sigkilled_holder_is_released_by_next_claim_and_gc,
    reused_pid_and_other_boot_are_stale_other_machines_are_not,
    claim_local_names_the_missing_resource_and_releases_on_drop,
    remove_force_and_json_output,
    first_use_from_many_threads_registers_the_local_host_once,
);

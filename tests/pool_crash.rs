//! kill -9 during claims and placements leaves the ledger consistent: every allocation is
//! whole or absent, none that was reported is lost, and dead holders are collected.
//!
//! No timing decides the outcome. Each child is killed at one of two fixed points:
//! before its claim can commit (this process holds the pool's write lock until the
//! child has been killed and reaped) or after it committed (the child has reported its
//! allocation on its stdout pipe). Some holders are not killed at all: their claims
//! must survive `gc`.

mod pool_util;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use minivmm::pool::{Amounts, Ledger, Resource};
use pool_util::{Scratch, ok};

/// A child killed (SIGKILL) and reaped on drop, so a failing assertion leaves no
/// holder running.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// `pool claim`: held until released explicitly, no owner.
    Plain,
    /// `pool claim --hold`: held by the process, stale once it is dead.
    Held,
    /// `schedule`: a placement, held until released explicitly.
    Placement,
}

fn command(pool: &Path, kind: Kind, host: &str, name: &str) -> Command {
    let mut c = match kind {
        Kind::Placement => {
            let mut c = pool_util::minivmm(pool, "schedule");
            c.args(["--vcpus", "1", "--memory", "1"]);
            c
        }
        Kind::Plain | Kind::Held => {
            let mut c = pool_util::minivmm(pool, "pool");
            c.args(["claim", host, "--vcpus", "1", "--memory", "1"]);
            if kind == Kind::Held {
                c.arg("--hold");
            }
            c
        }
    };
    c.args(["--name", name])
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Spawns the claim and reads the line it prints once its claim is committed; returns
/// the child (still unreaped, maybe exited) and the allocation id it reported.
fn spawn_until_committed(pool: &Path, kind: Kind, host: &str, name: &str) -> (Reaped, i64) {
    let mut child = Reaped(
        command(pool, kind, host, name)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn"),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    // "allocation 7 on h" from pool claim, "placed VM k4 on host h (allocation 7, ..."
    // from schedule.
    let id = line
        .strip_prefix("allocation ")
        .or_else(|| line.split("(allocation ").nth(1))
        .and_then(|r| r.split([' ', ',']).next())
        .and_then(|id| id.parse::<i64>().ok())
        .unwrap_or_else(|| panic!("{kind:?} {name} reported no allocation: {line:?}"));
    (child, id)
}

/// True once process `pid` has `file` open.
fn has_open(pid: u32, file: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == file))
}

/// Spawns the claim while this process holds the pool's write lock, waits until the
/// child has the pool open (it then waits for the lock, or is on its way to it), and
/// kills it before giving the lock up: its claim cannot have committed.
fn kill_before_commit(pool: &Path, kind: Kind, host: &str, name: &str) {
    let lock = rusqlite::Connection::open(pool).expect("sqlite");
    lock.busy_timeout(Duration::from_secs(30)).expect("busy");
    lock.execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let mut child = Reaped(
        command(pool, kind, host, name)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    let file = pool.canonicalize().expect("pool path");
    let start = Instant::now();
    while !has_open(child.0.id(), &file) {
        if let Some(st) = child.0.try_wait().expect("wait") {
            panic!("{kind:?} {name} ended ({st}) while the pool was locked");
        }
        // Only turns a hang into a failure; the kill below happens under the lock.
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{name} never opened the pool"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.0.kill().expect("kill -9");
    let st = child.0.wait().expect("reap");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(9),
        "{name} was not killed by SIGKILL: {st}"
    );
    lock.execute_batch("ROLLBACK").expect("give the lock up");
}

#[test]
fn kill_9_before_and_after_commit() {
    let s = Scratch::new("crash");
    let pool = s.pool();
    for host in ["h", "g"] {
        ok(
            &pool,
            &[
                "pool", "add-host", host, "--vcpus", "100", "--memory", "64G", "--disk", "10",
            ],
        );
    }

    // Background churn in this process keeps the write lock busy while children die.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (stop, path) = (stop.clone(), pool.clone());
        std::thread::spawn(move || {
            let ledger = Ledger::open(Some(&path)).expect("open");
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || n == 0 {
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

    // Claims whose process was killed before the commit: none may appear.
    let mut never = Vec::new();
    // Committed claims without an owner (plain and placements): never lost.
    let mut kept = Vec::new();
    // Committed claims of holders killed afterwards: stale, collected by gc at the latest.
    let mut dead = Vec::new();
    // Holders left alive: (process, allocation id).
    let mut survivors = Vec::new();
    for i in 0..30 {
        let kind = [Kind::Plain, Kind::Held, Kind::Placement][i % 3];
        let host = if i % 2 == 0 { "g" } else { "h" };
        let name = format!("k{i}");
        if (i / 3) % 2 == 1 {
            kill_before_commit(&pool, kind, host, &name);
            never.push(name);
        } else {
            let (mut child, id) = spawn_until_committed(&pool, kind, host, &name);
            child.0.kill().expect("kill -9");
            child.0.wait().expect("reap");
            if kind == Kind::Held {
                dead.push(id);
            } else {
                kept.push(id);
            }
        }
        if i % 10 == 5 {
            let name = format!("survivor{i}");
            survivors.push(spawn_until_committed(&pool, Kind::Held, host, &name));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let churned = churn.join().expect("churn thread");
    assert!(churned > 0);
    assert_eq!((never.len(), kept.len(), dead.len()), (15, 10, 5));
    assert_eq!(survivors.len(), 3);

    {
        let store = rusqlite::Connection::open(&pool).expect("sqlite");
        let check: String = store
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("check");
        assert_eq!(check, "ok");
    }
    let ledger = Ledger::open(Some(&pool)).expect("open");
    let before = ledger.store().allocations().expect("allocs");
    for a in &before {
        assert!(
            !never.contains(&a.vm_name),
            "{} was killed before its claim could commit, yet holds allocation {}",
            a.vm_name,
            a.id
        );
    }

    let collected: Vec<i64> = ledger.gc().expect("gc").iter().map(|a| a.id).collect();
    let after = ledger.store().allocations().expect("allocs");
    let live: Vec<i64> = after.iter().map(|a| a.id).collect();
    for id in &kept {
        assert!(live.contains(id), "reported allocation {id} was lost");
    }
    for id in &dead {
        assert!(
            !live.contains(id),
            "allocation {id} of a killed holder survived gc"
        );
        // Collected by this gc, or earlier by a claim that found its holder dead.
        assert!(
            collected.contains(id) || before.iter().all(|a| a.id != *id),
            "allocation {id} vanished but gc did not report it"
        );
    }
    for (child, id) in &survivors {
        let a = after
            .iter()
            .find(|a| a.id == *id)
            .unwrap_or_else(|| panic!("the live holder's allocation {id} was taken by gc"));
        assert_eq!(
            a.owner.as_ref().map(|o| o.pid),
            Some(child.0.id()),
            "allocation {id}"
        );
    }
    for a in &after {
        assert!(
            a.owner.is_none() || survivors.iter().any(|(_, id)| *id == a.id),
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
    assert_eq!(after.len(), kept.len() + survivors.len(), "{after:?}");

    let mut store = ledger.store();
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
    drop(store);

    // Once the survivors are dead too, gc collects exactly their claims.
    let mut held: Vec<i64> = survivors.iter().map(|(_, id)| *id).collect();
    drop(survivors);
    let mut collected: Vec<i64> = ledger.gc().expect("gc").iter().map(|a| a.id).collect();
    held.sort();
    collected.sort();
    assert_eq!(collected, held);
    eprintln!("{churned} churn claims");
}

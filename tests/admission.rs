//! `minivmm run` goes through the ledger: a VM that does not fit is refused before it
//! starts, and its claim is released however the VM ends (exit, timeout, guest error,
//! SIGTERM); after SIGKILL, `pool gc` finds the claim stale and releases it.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn pool(db: &Path, args: &[&str]) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_minivmm"))
        .arg("pool")
        .arg("--pool")
        .arg(db)
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "pool {args:?}: {}", stderr(&o));
    let text = stdout(&o);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("pool {args:?} printed no JSON ({e}): {text:?}"))
}

fn run(db: &Path, kernel: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_minivmm"))
        .arg("run")
        .arg("--pool")
        .arg(db)
        .arg("--kernel")
        .arg(kernel)
        .args(["--serial", "none"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A pool whose local host has exactly 4 usable vCPUs and 1 GiB.
fn small_pool(dir: &Path) -> std::path::PathBuf {
    let db = dir.join("pool.db");
    let host = pool(&db, &["init"]);
    let name = host["name"]
        .as_str()
        .or(host["host"]["name"].as_str())
        .map(str::to_string);
    let name = name.unwrap_or_else(|| {
        pool(&db, &["list"])[0]["name"]
            .as_str()
            .unwrap()
            .to_string()
    });
    pool(
        &db,
        &[
            "set-host",
            &name,
            "--vcpus",
            "4",
            "--cpu-ratio",
            "1",
            "--memory",
            "1G",
        ],
    );
    db
}

/// Starts a VM that holds all 4 vCPUs of the small pool until stopped, and waits
/// until its claim is in the ledger.
fn spawn_holder(db: &Path, spin: &Path) -> std::process::Child {
    let holder = Command::new(env!("CARGO_BIN_EXE_minivmm"))
        .arg("run")
        .arg("--pool")
        .arg(db)
        .arg("--kernel")
        .arg(spin)
        .args(["--vcpus", "4", "--serial", "none", "--timeout", "60s"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while live_allocations(db) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the claim never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    holder
}

fn live_allocations(db: &Path) -> usize {
    let all = pool(db, &["allocations"]);
    all.as_array()
        .unwrap_or_else(|| panic!("pool allocations printed no list: {all}"))
        .len()
}

#[test]
fn refused_when_it_does_not_fit_and_released_on_every_end() {
    if !kvm_or_skip("refused_when_it_does_not_fit_and_released_on_every_end") {
        return;
    }
    let d = scratch("admission");
    let db = small_pool(&d);
    let hello = tiny_guest(&d, "hello", &hello_body("hi", 1, true), true);
    let spin = tiny_guest(&d, "spin", "1: jmp 1b", true);
    let int3 = tiny_guest(
        &d,
        "int3",
        "  lidt idt\n  int3\nidt: .word 0\n .long 0",
        true,
    );

    let o = run(&db, &hello, &["--vcpus", "5"]);
    assert_eq!(o.status.code(), Some(125));
    let err = stderr(&o);
    assert!(
        err.contains("vcpus") && err.contains("asked 5") && err.contains("free 4"),
        "{err}"
    );
    let o = run(&db, &hello, &["--memory", "2G"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("memory"), "{}", stderr(&o));

    assert_eq!(
        run(&db, &hello, &["--vcpus", "4", "--memory", "1G"])
            .status
            .code(),
        Some(3)
    );
    assert_eq!(
        run(&db, &spin, &["--timeout", "200ms"]).status.code(),
        Some(124)
    );
    let failed = run(&db, &int3, &["--timeout", "20s"]).status.code();
    assert!(matches!(failed, Some(120) | Some(122)), "{failed:?}");
    assert_eq!(live_allocations(&db), 0, "every end releases the claim");
    // A bad kernel is refused after admission: the claim must not leak either.
    assert_eq!(
        run(&db, Path::new("/nonexistent"), &[]).status.code(),
        Some(125)
    );
    assert_eq!(live_allocations(&db), 0);

    // While one VM holds all 4 vCPUs, a second is refused; after SIGTERM it is free.
    let mut holder = spawn_holder(&db, &spin);
    assert_eq!(run(&db, &hello, &[]).status.code(), Some(125));
    unsafe { kill(holder.id() as i32, 15) };
    assert_eq!(holder.wait().unwrap().code(), Some(143));
    assert_eq!(live_allocations(&db), 0);
    assert_eq!(run(&db, &hello, &[]).status.code(), Some(3));
}

#[test]
fn sigkill_leaves_a_stale_claim_that_gc_releases() {
    if !kvm_or_skip("sigkill_leaves_a_stale_claim_that_gc_releases") {
        return;
    }
    let d = scratch("admission_kill");
    let db = small_pool(&d);
    let spin = tiny_guest(&d, "spin", "1: jmp 1b", true);
    let hello = tiny_guest(&d, "hello", &hello_body("hi", 1, true), true);
    let mut holder = spawn_holder(&db, &spin);
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(
        live_allocations(&db),
        1,
        "SIGKILL cannot release; the claim stays until found stale"
    );
    // The next claim finds the owner gone and releases its allocation first.
    assert_eq!(run(&db, &hello, &["--vcpus", "4"]).status.code(), Some(3));
    assert_eq!(live_allocations(&db), 0);
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// CI jobs starting at once on a fresh runner: several `minivmm run` processes find no
/// pool, all create it together, each claims, runs and releases. None may fail on the
/// half-made file, the local host is registered once, and no claim is left.
#[test]
fn parallel_runs_on_a_new_pool_all_succeed() {
    if !kvm_or_skip("parallel_runs_on_a_new_pool_all_succeed") {
        return;
    }
    let d = scratch("admission_first_use");
    let db = d.join("state").join("pool.db");
    let hello = tiny_guest(&d, "hello", &hello_body("hi", 2, true), true);
    let children: Vec<_> = (0..8)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_minivmm"))
                .arg("run")
                .arg("--pool")
                .arg(&db)
                .arg("--kernel")
                .arg(&hello)
                .args(["--serial", "none", "--no-pit", "--timeout", "30s"])
                .stdin(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    }
    assert_eq!(pool(&db, &["list"]).as_array().map(Vec::len), Some(1));
    assert_eq!(live_allocations(&db), 0);
}

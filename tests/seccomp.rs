//! seccomp (issue 16): every thread of a running VM is under a filter, a call
//! outside a thread's allow-list ends minivmm with a report in `strict` mode and is
//! only logged in `log` mode, and `off` leaves the threads unfiltered.
//!
//! The forbidden call comes from the fault injection `MINIVMM_SECCOMP_SELFTEST=vcpu`
//! (src/vmm/seccomp.rs): each vCPU thread calls getppid(2), on no list, right
//! after its filter is on.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{KillOnDrop, wait_or_kill};

/// A scratch directory of its own, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        Scratch(common::scratch(&format!(
            "seccomp-{tag}-{}",
            std::process::id()
        )))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Name → "Seccomp:" value of every thread of `pid`.
fn thread_modes(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        out.push((name.trim().to_string(), mode));
    }
    out
}

/// Starts a 2-vCPU spinning VM with the console on stdio (a writer thread for its
/// output, a reader for stdin), a disk, a share and entropy, so that every kind of
/// thread runs, and waits until they all do.
fn start_full_vm(dir: &Path, mode: &str) -> (KillOnDrop, Vec<(String, String)>) {
    let kernel = common::busy_smp_guest(dir);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let share = dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    let child = common::minivmm()
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .args([
            "--vcpus",
            "2",
            "--timeout",
            "60s",
            "--serial",
            "stdio",
            "--rng",
        ])
        .args(["--seccomp", mode])
        .arg("--disk")
        .arg(&disk)
        .arg("--share")
        .arg(format!("{},ro", share.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start minivmm");
    let mut child = KillOnDrop(child);
    let want = ["vcpu0", "vcpu1", "virtio", "console", "stdin", "signals"];
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = child.0.try_wait() {
            panic!("minivmm ended before its threads were seen: {st}");
        }
        let threads = thread_modes(child.0.id());
        let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
        if want.iter().all(|w| names.contains(w)) {
            // The main thread confines itself right after starting the others.
            std::thread::sleep(Duration::from_millis(300));
            let threads = thread_modes(child.0.id());
            return (child, threads);
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not every thread started within 30 s: {threads:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_thread_of_a_running_vm_is_filtered() {
    if !common::kvm_or_skip("every_thread_of_a_running_vm_is_filtered") {
        return;
    }
    let dir = Scratch::new("strict");
    let (mut child, threads) = start_full_vm(&dir.0, "strict");
    // SECCOMP_MODE_FILTER is 2 in /proc/PID/status (proc(5)).
    for (name, mode) in &threads {
        assert_eq!(mode, "2", "thread {name} is not filtered: {threads:?}");
    }
    assert!(threads.len() >= 7, "{threads:?}");
    common::signal(&child.0, libc::SIGTERM);
    assert_eq!(
        wait_or_kill(&mut child.0, Duration::from_secs(20)),
        Some(128 + libc::SIGTERM),
        "a filtered VM must still stop on SIGTERM and release its claim cleanly"
    );
}

#[test]
fn seccomp_off_leaves_the_threads_unfiltered() {
    if !common::kvm_or_skip("seccomp_off_leaves_the_threads_unfiltered") {
        return;
    }
    let dir = Scratch::new("off");
    let (mut child, threads) = start_full_vm(&dir.0, "off");
    for (name, mode) in &threads {
        assert_eq!(mode, "0", "thread {name} is filtered with --seccomp off");
    }
    common::signal(&child.0, libc::SIGTERM);
    wait_or_kill(&mut child.0, Duration::from_secs(20));
}

/// Runs the 2-vCPU spinner for `timeout` with the self-test on, in `mode`.
fn run_selftest(dir: &Path, pool: &Path, mode: &str) -> std::process::Output {
    let kernel = common::busy_smp_guest(dir);
    let mut c = common::minivmm();
    c.env("MINIVMM_POOL", pool)
        .env("MINIVMM_SECCOMP_SELFTEST", "vcpu")
        .arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .args(["--vcpus", "2", "--timeout", "2s", "--seccomp", mode]);
    common::output(c)
}

#[test]
fn a_forbidden_call_on_a_vcpu_thread_ends_minivmm_with_a_report() {
    if !common::kvm_or_skip("a_forbidden_call_on_a_vcpu_thread_ends_minivmm_with_a_report") {
        return;
    }
    let dir = Scratch::new("trap");
    let pool = dir.0.join("pool.db");
    let o = run_selftest(&dir.0, &pool, "strict");
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains(&format!(
            "seccomp: a vCPU thread made system call {}",
            libc::SYS_getppid
        )) && err.contains("a minivmm bug"),
        "{err}"
    );
    // The process ended inside a signal handler: its claim is a dead owner's,
    // which the next claim or `pool gc` releases.
    let gc = common::output({
        let mut c = common::minivmm();
        c.env("MINIVMM_POOL", &pool).args(["pool", "gc"]);
        c
    });
    assert!(
        common::stdout(&gc).contains("released 1 stale allocation"),
        "{}{}",
        common::stdout(&gc),
        common::stderr(&gc)
    );
}

#[test]
fn log_mode_lets_the_call_through_and_the_vm_runs_on() {
    if !common::kvm_or_skip("log_mode_lets_the_call_through_and_the_vm_runs_on") {
        return;
    }
    let dir = Scratch::new("log");
    let pool = dir.0.join("pool.db");
    let o = run_selftest(&dir.0, &pool, "log");
    let err = common::stderr(&o);
    // The guest spins until --timeout: 124, not 125.
    assert_eq!(o.status.code(), Some(124), "{err}");
    assert!(
        err.contains("seccomp self-test: the vCPU thread called getppid"),
        "{err}"
    );
    assert!(!err.contains("made system call"), "{err}");
}

#[test]
fn an_unknown_mode_is_refused_with_the_choices() {
    let o = common::output({
        let mut c = common::minivmm();
        c.args(["run", "--kernel", "/nonexistent", "--seccomp", "on"]);
        c
    });
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("unknown seccomp mode 'on'") && err.contains("strict"),
        "{err}"
    );
}

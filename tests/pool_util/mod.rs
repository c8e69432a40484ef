//! Helpers shared by the pool and scheduler tests: scratch pools and the CLI binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// A scratch directory removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "minivmm-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch { dir }
    }

    pub fn pool(&self) -> PathBuf {
        self.dir.join("pool.db")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `minivmm <sub> --pool P`, ready for more arguments.
pub fn minivmm(pool: &Path, sub: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_minivmm"));
    c.env_remove("MINIVMM_POOL").env("RUST_LOG", "warn");
    c.arg(sub).arg("--pool").arg(pool);
    c
}

/// Runs `minivmm <sub> --pool P args...` and returns its output.
pub fn run(pool: &Path, args: &[&str]) -> Output {
    minivmm(pool, args[0])
        .args(&args[1..])
        .output()
        .expect("run minivmm")
}

/// Runs and expects success; returns stdout.
pub fn ok(pool: &Path, args: &[&str]) -> String {
    let out = run(pool, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs and expects failure; returns stderr.
pub fn fails(pool: &Path, args: &[&str]) -> String {
    let out = run(pool, args);
    assert!(!out.status.success(), "{args:?} unexpectedly succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Everything a user can see of the pool, for "nothing changed" checks.
pub fn snapshot(pool: &Path) -> String {
    ok(pool, &["pool", "--json", "list"]) + &ok(pool, &["pool", "--json", "allocations"])
}

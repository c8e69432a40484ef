//! The `pool` and `schedule` command lines as users type them, run through the
//! real binary: `--pool` and `--json` work before or after the subcommand.

mod pool_util;

use pool_util::{Backend, Scratch};
use std::process::Command;

fn minivmm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_minivmm"))
        .env_remove("MINIVMM_POOL")
        .env("RUST_LOG", "warn")
        .args(args)
        .output()
        .expect("run minivmm")
}

fn json(o: &std::process::Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

fn pool_and_json_work_before_or_after_the_subcommand(b: Backend) {
    let s = Scratch::with("pool-cli", b);
    let pool = s.pool();
    let p = pool.to_str().unwrap();
    pool_util::ok(
        &pool,
        &[
            "pool", "add-host", "h1", "--vcpus", "8", "--memory", "16G", "--disk", "10",
        ],
    );
    let before = json(&minivmm(&["pool", "--pool", p, "--json", "list"]));
    let after = json(&minivmm(&["pool", "list", "--pool", p, "--json"]));
    assert_eq!(before, after);
    assert!(before.to_string().contains("\"h1\""), "{before}");

    let placed = json(&minivmm(&[
        "schedule", "--vcpus", "2", "--memory", "4G", "--pool", p, "--json",
    ]));
    assert!(placed.to_string().contains("\"h1\""), "{placed}");
}

#[test]
fn help_of_every_pool_command_prints() {
    for sub in [
        &["pool", "--help"][..],
        &["pool", "list", "--help"],
        &["pool", "add-host", "--help"],
        &["schedule", "--help"],
    ] {
        let o = minivmm(sub);
        assert!(
            o.status.success(),
            "{sub:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Usage:"),
            "{sub:?}"
        );
    }
}

crate::conformance!(pool_and_json_work_before_or_after_the_subcommand,);

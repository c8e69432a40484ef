//! Criterion benchmarks of one VM's life, through the library (no process start):
//!
//! - `vm/create_destroy`: `Vm::new` (guest memory, kernel load, KVM VM, irqchip, PIT,
//!   one vCPU) and drop, for bench/guests/hello.elf.
//! - `vm/run_hello`: `Vm::new` + `Vm::run` of hello.elf to its isa-debug-exit.
//! - `vm/exit_round_trip`: a guest doing 1000 writes to port 0x80, timed by the
//!   outcome's `run_time` (vCPU thread start to join: VM build and teardown are left
//!   out); throughput is in exits, so criterion reports exits/s and the time per
//!   iteration / 1001 is one exit's round trip.
//!
//! `cargo bench --bench vm` (about two minutes here). Needs /dev/kvm, gcc and ld;
//! without /dev/kvm it says so and measures nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use minivmm::{Vm, VmConfig};

/// Port writes in the exit guest.
const EXITS: u32 = 1000;

/// Builds the bench guests under target/ once and returns their directory.
fn guests() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-guests");
    let ok = Command::new("make")
        .args(["-s", "-C"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/guests"))
        .arg(format!("O={}", dir.display()))
        .arg(format!("EXIT_COUNTS={EXITS}"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "cannot build bench/guests (needs make, gcc, ld)");
    dir
}

fn kvm_usable() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("\n*** SKIP benches/vm.rs: /dev/kvm is missing or not usable ***\n");
    }
    ok
}

fn build(kernel: &Path) -> Vm {
    Vm::new(VmConfig::new(kernel)).expect("cannot build the bench VM")
}

fn vm_benches(c: &mut Criterion) {
    if !kvm_usable() {
        return;
    }
    let dir = guests();
    let hello = dir.join("hello.elf");
    let exits = dir.join(format!("exits-{EXITS}.elf"));

    let mut g = c.benchmark_group("vm");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));

    g.bench_function("create_destroy", |b| {
        b.iter(|| drop(std::hint::black_box(build(&hello))))
    });

    g.bench_function("run_hello", |b| {
        b.iter(|| {
            let outcome = build(&hello).run().expect("hello failed to run");
            assert_eq!(
                outcome.exit_status(),
                1,
                "hello ended with {:?}",
                outcome.end
            );
        })
    });

    g.throughput(Throughput::Elements(u64::from(EXITS) + 1));
    g.bench_function("exit_round_trip", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let outcome = build(&exits).run().expect("exit guest failed to run");
                total += outcome.run_time;
                assert_eq!(outcome.exits.total(), u64::from(EXITS) + 1);
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, vm_benches);
criterion_main!(benches);

//! VM create + destroy from the library, in a loop: what a program that embeds minivmm
//! pays per VM before and after the guest runs.
//!
//! ```text
//! cargo run --release --example vm_cycle -- [--irqchip kernel|split] [--no-pit] [--count N] KERNEL
//! ```
//!
//! Each cycle is `Vm::new` (memory, kernel load, KVM VM, interrupt controllers,
//! devices, vCPU set-up) then dropping the `Vm` (closing the vCPU and VM fds: the
//! host kernel's teardown, then unmapping guest memory), with the tiny guest's default
//! size (1 vCPU, 128 MiB). Prints one line: the irqchip mode, cycles, and the median
//! and 90th percentile of create_ms, destroy_ms and their sum.

use std::time::{Duration, Instant};

use minivmm::vmm::{IrqChip, Vm, VmConfig};

fn main() {
    let mut irqchip = IrqChip::default();
    let mut pit = true;
    let mut count = 200usize;
    let mut kernel = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--irqchip" => {
                let v = args.next().unwrap_or_default();
                irqchip = v.parse().unwrap_or_else(|e: String| die(&e));
            }
            "--no-pit" => pit = false,
            "--count" => {
                count = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| die("--count needs a number"))
            }
            _ if !a.starts_with('-') => kernel = Some(a),
            _ => die(&format!("unknown argument '{a}'")),
        }
    }
    let kernel = kernel.unwrap_or_else(|| die("give a kernel, e.g. bench/guests/hello.elf"));
    let (mut create, mut destroy, mut both) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..count {
        let mut config = VmConfig::new(&kernel);
        config.irqchip = irqchip;
        config.pit = pit;
        let t0 = Instant::now();
        let vm = Vm::new(config).unwrap_or_else(|e| die(&e.to_string()));
        let t1 = Instant::now();
        drop(vm);
        let t2 = Instant::now();
        create.push(t1 - t0);
        destroy.push(t2 - t1);
        both.push(t2 - t0);
    }
    println!(
        "irqchip={} pit={pit} cycles={count} create_ms={} destroy_ms={} cycle_ms={}",
        irqchip.name(),
        stats(&mut create),
        stats(&mut destroy),
        stats(&mut both)
    );
}

/// "median/p90" in milliseconds.
fn stats(v: &mut [Duration]) -> String {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    format!("{:.3}/{:.3}", at(0.5), at(0.9))
}

fn die(msg: &str) -> ! {
    eprintln!("vm_cycle: {msg}");
    std::process::exit(2)
}

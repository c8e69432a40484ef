//! The memory guest under minivmm: the memory map on both entry paths for 64M,
//! 1G and 5G (RAM above 4 GiB), with every RAM region written and read back.

mod common;
mod guest_support;

use guest_support::*;

/// Parses "memory: total K KiB (M MiB) in N ram regions: ok".
fn total_kib(r: &Run) -> u64 {
    let line = r.line("memory: total ");
    assert!(line.ends_with(": ok"), "{}", r.ctx());
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[test]
fn memory_map_and_every_ram_region_work() {
    if !common::kvm_or_skip("memory_map_and_every_ram_region_work") {
        return;
    }
    for kernel in both("memory") {
        for (mem, mib) in [("64M", 64u64), ("1G", 1024), ("5G", 5120)] {
            // Not about admission: 5G must run on a host with less free RAM too.
            let r = run_with(&kernel, "", 1, mem, "10s", Input::None, &["--no-ledger"]);
            r.assert_end("debug-exit", 33);
            assert_eq!(r.json["memory_mib"], mib, "{}", r.ctx());
            // All of RAM but the legacy hole 640 KiB - 1 MiB (and no more).
            let kib = total_kib(&r);
            assert!(
                kib <= mib * 1024 && kib >= mib * 1024 - 1024,
                "{kib} KiB\n{}",
                r.ctx()
            );
            let ram: Vec<&str> = r
                .console
                .lines()
                .filter(|l| l.starts_with("memory: ram "))
                .collect();
            assert!(ram.iter().all(|l| l.ends_with(" ok")), "{}", r.ctx());
            assert!(
                ram.iter()
                    .any(|l| l.starts_with("memory: ram 0x0000000000100000-")),
                "no RAM at 1 MiB\n{}",
                r.ctx()
            );
            let high = ram
                .iter()
                .any(|l| l.starts_with("memory: ram 0x0000000100000000-"));
            assert_eq!(
                high,
                mib > 3072,
                "RAM above 4 GiB iff more than 3 GiB\n{}",
                r.ctx()
            );
        }
    }
}

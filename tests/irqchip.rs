//! The two homes of the interrupt controllers (`--irqchip kernel|split`): a hostile
//! guest that programs the IOAPIC, the 8259s and the PIT with nonsense, in both; and
//! what the split mode's tables tell the guest. The other tiny-guest tests run in
//! whichever mode MINIVMM_IRQCHIP names (scripts/test.sh runs them in both).

mod common;
mod guest_support;

use guest_support::*;

/// Every register and port value, then the fastest PIT, then parked with that timer
/// running and its pin masked: minivmm survives, and while the guest is parked it
/// spends (almost) no CPU time — the split irqchip's timer thread sleeps while nobody
/// can hear its ticks.
#[test]
fn a_hostile_guest_costs_cpu_time_only_in_both_modes() {
    if !common::kvm_or_skip("a_hostile_guest_costs_cpu_time_only_in_both_modes") {
        return;
    }
    for mode in ["kernel", "split"] {
        let mut cpu = Vec::new();
        // Long enough to reach the parked state on a slow nested KVM too (~1 s there).
        for timeout in ["3s", "6s"] {
            let r = run_with(
                "chaos.elf",
                "",
                1,
                "64M",
                timeout,
                Input::None,
                &["--irqchip", mode],
            );
            r.assert_end("timeout", 124);
            r.assert_line("chaos: pic ok");
            r.assert_line("chaos: pit ok");
            r.assert_line("chaos: fast pit: 500 ticks");
            r.assert_line("chaos: parked with the pit running");
            // The IOAPIC still answers as one after the nonsense (82093AA, 24 pins).
            r.assert_line("chaos: ioapic ok (version 0x170011)");
            cpu.push(r.json["cpu_ms"].as_f64().expect("cpu_ms in the JSON"));
        }
        // 3 s more of being parked: a spinning thread would add ~3,000 ms.
        let parked = cpu[1] - cpu[0];
        assert!(
            parked < 300.0,
            "--irqchip {mode}: 3 s more of a parked guest cost {parked:.0} ms of CPU ({cpu:?})"
        );
    }
}

/// Both modes run the same guests; only the tables differ: with a split irqchip there
/// are no 8259s, so the MADT drops PC-AT compatibility (the acpi guest prints its flag)
/// and the MP table LINT0's ExtINT entry.
#[test]
fn both_modes_boot_smp_and_acpi_guests() {
    if !common::kvm_or_skip("both_modes_boot_smp_and_acpi_guests") {
        return;
    }
    for mode in ["kernel", "split"] {
        let extra = ["--irqchip", mode];
        let r = run_with("cpus.elf", "", 4, "64M", "10s", Input::None, &extra);
        r.assert_end("debug-exit", 33);
        let r = run_with("acpi.elf", "", 2, "64M", "10s", Input::None, &extra);
        r.assert_end("poweroff", 0);
        let pcat = if mode == "kernel" { 1 } else { 0 };
        assert!(
            r.line("acpi: madt apic-ids ")
                .ends_with(&format!(" pcat {pcat}")),
            "{}",
            r.ctx()
        );
        let r = run_with(
            "irq.elf",
            "",
            1,
            "64M",
            "10s",
            Input::After("irq: waiting for serial input", b"y"),
            &extra,
        );
        r.assert_line("irq: serial ok (ioapic pin 4) byte 0x79");
        r.assert_end("debug-exit", 33);
    }
}

//! The cpus guest (MP table, INIT-SIPI-SIPI) and the acpi guest (RSDP, XSDT,
//! MADT, FADT power off) under minivmm with 1, 2, 4 and 8 vCPUs.

mod common;
mod guest_support;

use guest_support::*;

// These are not about admission: `--no-ledger`, so 8 vCPUs run on a 1-core host too
// (the ledger offers 4 vCPUs a core).

fn apic_ids(n: u32) -> String {
    (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

#[test]
fn cpus_every_vcpu_starts_and_reports_its_apic_id() {
    if !common::kvm_or_skip("cpus_every_vcpu_starts_and_reports_its_apic_id") {
        return;
    }
    for kernel in both("cpus") {
        for n in [1, 2, 4, 8] {
            let r = run_with(&kernel, "", n, "64M", "10s", Input::None, &["--no-ledger"]);
            r.assert_end("debug-exit", 33);
            assert_eq!(r.json["vcpus"], n, "{}", r.ctx());
            r.assert_line(&format!("cpus: mp-table ok processors {n}"));
            r.assert_line(&format!("cpus: ok {n} apic-ids {}", apic_ids(n)));
        }
    }
}

#[test]
fn acpi_tables_list_every_vcpu_and_power_off_works() {
    if !common::kvm_or_skip("acpi_tables_list_every_vcpu_and_power_off_works") {
        return;
    }
    for kernel in both("acpi") {
        for n in [1, 2, 4, 8] {
            let r = run_with(&kernel, "", n, "64M", "10s", Input::None, &["--no-ledger"]);
            r.assert_line(&format!("acpi: rsdp ok xsdt ok madt ok lapics {n} fadt ok"));
            assert!(
                r.line("acpi: madt apic-ids ")
                    .starts_with(&format!("acpi: madt apic-ids {} ", apic_ids(n))),
                "{}",
                r.ctx()
            );
            assert!(
                r.line("acpi: powering off").contains("s5 type"),
                "{}",
                r.ctx()
            );
            r.assert_end("poweroff", 0);
        }
    }
}

//! Disassembles every ACPI table minivmm generates with `iasl -d` (Debian's
//! acpica-tools) and asserts ACPICA finds no errors in them: the tables are what a
//! real OS's ACPI interpreter accepts, not only what our own unit tests expect.

mod common;
use common::*;
use std::process::Command;

/// True when `iasl` runs; otherwise [`skip`]s (a failure in CI or with
/// MINIVMM_REQUIRE_IASL=1, which scripts/test.sh sets) and returns false.
fn iasl_or_skip(test: &str) -> bool {
    match Command::new("iasl").arg("-v").output() {
        Ok(_) => true,
        Err(e) => {
            skip(
                test,
                "MINIVMM_REQUIRE_IASL",
                &format!("cannot run iasl ({e}); it checks the ACPI tables"),
                "install Debian's acpica-tools (apt-get install acpica-tools; scripts/test.sh does)",
            );
            false
        }
    }
}

#[test]
fn iasl_disassembles_every_table_without_errors() {
    if !iasl_or_skip("iasl_disassembles_every_table_without_errors") {
        return;
    }
    use minivmm::vmm::devices::mmio::MmioSlot;
    // With no device, and with every virtio device slot in use.
    let all: Vec<MmioSlot> = (0..).map_while(MmioSlot::nth).collect();
    for (vcpus, devices) in [(1, &all[..0]), (4, &all[..]), (254, &all[..2])] {
        let dir = scratch(&format!("acpi-iasl-{vcpus}"));
        let tables = minivmm::vmm::boot::acpi::build(vcpus, devices, true).unwrap();
        // iasl has no disassembler for the RSDP (not a table with a header); the unit
        // tests in boot/acpi.rs check its checksums and pointer.
        for t in tables.iter().filter(|t| t.name != "RSDP") {
            let file = dir.join(format!("{}.dat", t.name.to_lowercase()));
            std::fs::write(&file, &t.bytes).unwrap();
            let out = Command::new("iasl")
                .arg("-d")
                .arg(&file)
                .current_dir(&dir)
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!("--- iasl -d {} ({vcpus} vCPUs)\n{text}", t.name);
            assert!(out.status.success(), "iasl -d {} failed:\n{text}", t.name);
            let dsl = std::fs::read_to_string(file.with_extension("dsl"))
                .unwrap_or_else(|e| panic!("no disassembly of {}: {e}\n{text}", t.name));
            for bad in ["Error", "Invalid", "**** ", "Unknown"] {
                assert!(
                    !text.contains(bad) && !dsl.contains(bad),
                    "iasl reports {bad:?} for {}:\n{text}\n{dsl}",
                    t.name
                );
            }
            if t.name == "DSDT" {
                // Each virtio device as Linux's virtio_mmio ACPI match expects it.
                assert_eq!(dsl.matches("\"LNRO0005\"").count(), devices.len(), "{dsl}");
                for d in devices {
                    let mem = format!(
                        "Memory32Fixed (ReadWrite,\n                    0x{:08X},",
                        d.base
                    );
                    assert!(dsl.contains(&mem), "no {mem:?} in\n{dsl}");
                    let irq = format!("{{\n                    0x{:08X},", d.irq);
                    assert!(dsl.contains(&irq), "no interrupt {} in\n{dsl}", d.irq);
                }
            }
        }
    }
}

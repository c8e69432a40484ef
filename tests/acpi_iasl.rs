//! Disassembles every ACPI table minivmm generates with `iasl -d` (Debian's
//! acpica-tools) and asserts ACPICA finds no errors in them: the tables are what a
//! real OS's ACPI interpreter accepts, not only what our own unit tests expect.

mod common;
use common::*;
use std::process::Command;

fn iasl_or_skip(test: &str) -> bool {
    let ok = Command::new("iasl").arg("-v").output().is_ok();
    if !ok {
        if std::env::var("MINIVMM_REQUIRE_IASL").as_deref() == Ok("1") {
            panic!("{test}: iasl is missing but MINIVMM_REQUIRE_IASL=1");
        }
        eprintln!(
            "\n*** SKIP {test}: iasl is missing; install Debian's acpica-tools \
             (apt-get install acpica-tools) to check the ACPI tables ***\n"
        );
    }
    ok
}

#[test]
fn iasl_disassembles_every_table_without_errors() {
    if !iasl_or_skip("iasl_disassembles_every_table_without_errors") {
        return;
    }
    for vcpus in [1, 4, 254] {
        let dir = scratch(&format!("acpi-iasl-{vcpus}"));
        let tables = minivmm::vmm::boot::acpi::build(vcpus).unwrap();
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
        }
    }
}

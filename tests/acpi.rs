//! ACPI power-off and the CMOS clock, with tiny guests assembled here: a guest that
//! follows RSDP → XSDT → FADT to the power management registers and enters S5 ends
//! the VM with status 0 and "poweroff"; other sleep states do not end it; a guest
//! reading the clock through ports 0x70/0x71 sees the host's year, in BCD or binary.

mod common;
use common::*;
use minivmm::vmm::boot::acpi::RSDP_ADDR;
use minivmm::vmm::devices::acpi_pm::S5_SLP_TYP;
use minivmm::vmm::devices::cmos::{DateTime, to_bcd};

fn json(o: &std::process::Output) -> serde_json::Value {
    let s = stdout(o);
    serde_json::from_str(s.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("bad JSON {s:?}: {e}"))
}

fn run(dir: &std::path::Path, name: &str, body: &str, pvh: bool) -> std::process::Output {
    let k = tiny_guest(dir, name, body, pvh);
    output({
        let mut c = minivmm();
        c.arg("run").arg("--kernel").arg(&k).args([
            "--serial",
            "none",
            "--json",
            "--timeout",
            "20s",
        ]);
        c
    })
}

/// Assembly that finds the FADT through the RSDP at its fixed address and the XSDT's
/// first entry, checks its signature (else debug-exit 0x7f), and leaves it in %eax.
fn find_fadt() -> String {
    format!(
        "  mov {xsdt_ptr:#x}, %eax\n  mov 36(%eax), %eax\n  cmpl $0x50434146, (%eax)\n  je 1f\n\
         \x20 mov $0xf4, %dx\n  mov $0x7f, %eax\n  out %eax, %dx\n1:\n",
        xsdt_ptr = RSDP_ADDR + 24
    )
}

/// Boots a guest that writes `value` (`reg` is "%ax" or "%al") to the port the FADT
/// holds at `offset`, and expects a clean power-off.
fn assert_s5_powers_off(test: &str, offset: u32, value: u32, reg: &str, pvh: bool) {
    if !kvm_or_skip(test) {
        return;
    }
    let d = scratch(test);
    let body = format!(
        "{}  mov {offset}(%eax), %edx\n  mov ${value:#x}, {reg}\n  out {reg}, %dx\n  hlt\n",
        find_fadt()
    );
    let o = run(&d, test, &body, pvh);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(json(&o)["reason"], "poweroff");
}

#[test]
fn s5_through_pm1a_control_powers_off() {
    // FADT offset 64: PM1a_CNT_BLK. SLP_TYP in bits 10-12, SLP_EN is bit 13.
    let value = (u32::from(S5_SLP_TYP) << 10) | (1 << 13);
    assert_s5_powers_off("s5_through_pm1a_control_powers_off", 64, value, "%ax", true);
}

#[test]
fn s5_through_sleep_control_register_powers_off() {
    // FADT offset 244: SLEEP_CONTROL_REG, a GAS whose address is at +4. SLP_TYP in
    // bits 2-4, SLP_EN is bit 5.
    let value = (u32::from(S5_SLP_TYP) << 2) | (1 << 5);
    assert_s5_powers_off(
        "s5_through_sleep_control_register_powers_off",
        248,
        value,
        "%al",
        false,
    );
}

#[test]
fn other_sleep_states_do_not_end_the_vm() {
    if !kvm_or_skip("other_sleep_states_do_not_end_the_vm") {
        return;
    }
    let d = scratch("acpi_s3");
    // S3 with SLP_EN through PM1a_CNT, then debug-exit 0x10 (status 33).
    let body = format!(
        "{}  mov 64(%eax), %edx\n  mov ${:#x}, %ax\n  out %ax, %dx\n\
         \x20 mov $0xf4, %dx\n  mov $0x10, %eax\n  out %eax, %dx\n  hlt\n",
        find_fadt(),
        (3u32 << 10) | (1 << 13)
    );
    let o = run(&d, "s3", &body, true);
    assert_eq!(o.status.code(), Some(33), "{}", stderr(&o));
    assert_eq!(json(&o)["reason"], "debug-exit");
}

/// Reads CMOS register A (exits with 0x7e if update-in-progress is set), the seconds
/// (exits with 0x7d unless they are valid for the mode), then exits with the year.
fn clock_body(binary: bool) -> String {
    let mut s = String::new();
    if binary {
        // Register B: 24-hour (bit 1) and binary (bit 2).
        s.push_str("  mov $0x0b, %al\n  out %al, $0x70\n  mov $0x06, %al\n  out %al, $0x71\n");
    }
    s.push_str(
        "  mov $0x0a, %al\n  out %al, $0x70\n  in $0x71, %al\n  test $0x80, %al\n  jz 1f\n\
         \x20 mov $0x7e, %eax\n  out %eax, $0xf4\n1:\n\
         \x20 mov $0x00, %al\n  out %al, $0x70\n  in $0x71, %al\n",
    );
    if binary {
        s.push_str("  cmp $59, %al\n  jbe 2f\n");
    } else {
        // BCD: high digit at most 5, low digit at most 9.
        s.push_str(
            "  mov %al, %bl\n  and $0x0f, %bl\n  cmp $9, %bl\n  ja 3f\n\
             \x20 cmp $0x59, %al\n  jbe 2f\n3:\n",
        );
    }
    s.push_str(
        "  mov $0x7d, %eax\n  out %eax, $0xf4\n2:\n\
         \x20 mov $0x09, %al\n  out %al, $0x70\n  xor %eax, %eax\n  in $0x71, %al\n\
         \x20 out %eax, $0xf4\n  hlt\n",
    );
    s
}

#[test]
fn cmos_clock_shows_the_host_year_in_bcd_and_binary() {
    if !kvm_or_skip("cmos_clock_shows_the_host_year_in_bcd_and_binary") {
        return;
    }
    let d = scratch("cmos_clock");
    for (binary, pvh) in [(false, true), (true, false)] {
        let o = run(&d, &format!("clock{binary}"), &clock_body(binary), pvh);
        let yy = (DateTime::now().year % 100) as u8;
        let want = if binary { yy } else { to_bcd(yy) };
        let j = json(&o);
        assert_eq!(j["reason"], "debug-exit", "{}", stderr(&o));
        assert_eq!(
            j["debug_exit_value"],
            u32::from(want),
            "binary={binary}: 0x7e = update in progress, 0x7d = bad seconds"
        );
    }
}

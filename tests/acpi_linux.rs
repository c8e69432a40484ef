//! Boots the minimal Linux built like Debian's kernels — CONFIG_ACPI on, the MP-table
//! parser off (`scripts/build-linux.sh --variant acpi`) — so that it can learn its
//! CPUs only from minivmm's ACPI MADT, and asserts what this host can show.
//!
//! Under PVM (guest ring 0 emulated, see `minivmm check` in README.md) that is the early boot
//! log: the tables found from the RSDP, the MADT in use, the IOAPIC and SCI override,
//! "Allowing N CPUs"; and, with kvm-clock off so the kernel reads the wall-clock time
//! from the CMOS, no RTC error. On hardware KVM the kernel boots to the initramfs'
//! /init, which reports every vCPU online and powers off through ACPI (status 0,
//! reason "poweroff").

mod common;
use common::linux::{Boot, BootSpec, boot as boot_spec, boot_with, files_or_skip, hardware_kvm};
use std::path::PathBuf;
use std::time::Duration;

const CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1";

/// How long a boot may take: minutes of emulated ring 0 under PVM; 20-60 s on the
/// nested hardware-style KVM of scripts/test-nested-kvm.sh, two boots at a time.
const LIMIT: Duration = Duration::from_secs(300);

/// The ACPI kernel and the initramfs that ends with `poweroff -f`.
fn guest_or_skip(test: &str) -> Option<Vec<PathBuf>> {
    files_or_skip(
        test,
        &["MINIVMM_LINUX_ACPI_VMLINUX", "MINIVMM_INITRAMFS_POWEROFF"],
    )
}

fn boot(g: &[PathBuf], vcpus: u32, cmdline_extra: &str, want: &[String], limit: Duration) -> Boot {
    boot_spec(&BootSpec {
        kernel: &g[0],
        initrd: &g[1],
        cmdline: &format!("{CMDLINE}{cmdline_extra}"),
        vcpus,
        memory: "128M",
        want,
        limit,
    })
}

/// The early lines that show the kernel took its CPUs and interrupt routing from
/// minivmm's ACPI tables.
fn madt_lines(vcpus: u32) -> Vec<String> {
    vec![
        "ACPI: RSDP 0x00000000000E0000 000024 (v02 MINVMM)".to_string(),
        "ACPI: XSDT 0x".to_string(),
        "ACPI: FACP 0x".to_string(),
        "ACPI: DSDT 0x".to_string(),
        "ACPI: APIC 0x".to_string(),
        "ACPI: LAPIC_NMI (acpi_id[0xff] dfl dfl lint[0x1])".to_string(),
        format!("IOAPIC[0]: apic_id {vcpus}, version 17, address 0xfec00000, GSI 0-23"),
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 9 global_irq 9 high level)".to_string(),
        "ACPI: Using ACPI (MADT) for SMP configuration information".to_string(),
        format!("smpboot: Allowing {vcpus} CPUs, 0 hotplug CPUs"),
    ]
}

/// The lines that show ACPICA loaded minivmm's DSDT, found \_S5_ and used it for
/// `poweroff -f`. (A kernel built without CONFIG_PCI loads no table at all:
/// "AE_BAD_PARAMETER, During Region initialization", see scripts/linux/acpi.config.)
fn acpi_power_lines() -> Vec<String> {
    [
        "ACPI: 1 ACPI AML tables successfully acquired and loaded",
        "ACPI: Interpreter enabled",
        "ACPI: PM: (supports S0 S5)",
        "ACPI: PM: Preparing to enter system sleep state S5",
        "reboot: Power down",
    ]
    .map(String::from)
    .to_vec()
}

fn check(vcpus: u32) {
    let test = format!("acpi_linux_{vcpus}cpus");
    let Some(g) = guest_or_skip(&test) else {
        return;
    };
    if hardware_kvm() {
        // To its own end: `poweroff -f` through the FADT's sleep registers.
        let b = boot(&g, vcpus, "", &[], LIMIT);
        b.assert_console_has(&madt_lines(vcpus));
        b.assert_console_has(&acpi_power_lines());
        b.assert_console_lacks(&[
            "MP-table",
            "Unable to load the System Description Tables",
            "reboot: System halted",
        ]);
        b.assert_full_boot(vcpus, "poweroff -f", "poweroff");
        return;
    }
    let want = madt_lines(vcpus);
    let b = boot(&g, vcpus, "", &want, LIMIT);
    b.assert_console_has(&want);
    b.assert_console_lacks(&["MP-table", "ACPI Error", "ACPI BIOS Error"]);
    assert!(
        b.stopped_by_test || matches!(b.status, Some(122) | Some(124)),
        "{}",
        b.ctx()
    );
}

#[test]
fn acpi_linux_1cpu() {
    check(1);
}

#[test]
fn acpi_linux_2cpus() {
    check(2);
}

#[test]
fn acpi_linux_4cpus() {
    check(4);
}

/// Without kvm-clock the kernel reads the wall-clock time from the CMOS RTC in
/// timekeeping_init. With no RTC there (ports reading all-ones, update-in-progress
/// set for ever) it waits a second and logs "Unable to read current time from RTC";
/// with minivmm's CMOS it reads the time at once. The console comes up after that.
#[test]
fn acpi_linux_reads_the_rtc_without_waiting() {
    let Some(g) = guest_or_skip("acpi_linux_reads_the_rtc_without_waiting") else {
        return;
    };
    let done = if hardware_kvm() {
        "minivmm-init: reached /init"
    } else {
        "printk: console [ttyS0] enabled"
    };
    // Without kvm-clock the kernel also calibrates the TSC against the PIT, polling
    // port 0x61 (at least 1,000 reads in 10 ms, arch/x86/kernel/tsc.c). With a split
    // irqchip each read is an exit to minivmm: a few µs on hardware, ~60 µs in the
    // outer VM of scripts/test-nested-kvm.sh, where the calibration then fails and
    // the kernel stalls. There (MINIVMM_NESTED_TCG=1) this test takes KVM's PIT,
    // which answers inside the host kernel.
    let nested_tcg = std::env::var("MINIVMM_NESTED_TCG").as_deref() == Ok("1");
    let extra: Vec<String> = if nested_tcg {
        vec!["--irqchip".into(), "kernel".into()]
    } else {
        Vec::new()
    };
    let want = [done.to_string()];
    let spec = BootSpec {
        kernel: &g[0],
        initrd: &g[1],
        cmdline: &format!("{CMDLINE} no-kvmclock"),
        vcpus: 1,
        memory: "128M",
        want: &want,
        limit: LIMIT,
    };
    let b = boot_with(&spec, &extra);
    assert!(b.console.contains(done), "{}", b.ctx());
    b.assert_console_lacks(&["Unable to read current time from RTC"]);
}

/// Debian's own cloud kernel — built without the MP-table parser, so it can find CPUs
/// only in the MADT — sees every vCPU. Under PVM it is booted from the ELF that
/// scripts/fetch-debian-kernel.sh extracts (the bzImage's LZ4 decompressor alone
/// would take minutes of emulated ring 0) and the test stops at "Allowing N CPUs"; on
/// hardware KVM it boots to /init, reports every vCPU online and powers off through
/// ACPI (status 0), and a second boot ends with `reboot -f` through the i8042.
#[test]
fn debian_cloud_kernel_sees_every_vcpu() {
    let Some(f) = files_or_skip(
        "debian_cloud_kernel_sees_every_vcpu",
        &[
            "MINIVMM_DEBIAN_VMLINUX",
            "MINIVMM_INITRAMFS_POWEROFF",
            "MINIVMM_INITRAMFS",
        ],
    ) else {
        return;
    };
    let vcpus = 2;
    let debian = |initrd: &PathBuf, want: &[String]| {
        let b = boot_spec(&BootSpec {
            kernel: &f[0],
            initrd,
            cmdline: CMDLINE,
            vcpus,
            memory: "256M",
            want,
            limit: LIMIT,
        });
        assert!(
            b.console.contains("-cloud-amd64"),
            "not Debian's kernel? {}",
            b.ctx()
        );
        b
    };
    if hardware_kvm() {
        let b = debian(&f[1], &[]);
        b.assert_console_has(&madt_lines(vcpus));
        b.assert_console_has(&acpi_power_lines());
        b.assert_full_boot(vcpus, "poweroff -f", "poweroff");
        let b = debian(&f[2], &[]);
        b.assert_full_boot(vcpus, "reboot -f", "reset");
        return;
    }
    let want: Vec<String> = madt_lines(vcpus)
        .into_iter()
        .filter(|l| l.contains("Using ACPI (MADT)") || l.contains("Allowing"))
        .collect();
    let b = debian(&f[1], &want);
    b.assert_console_has(&want);
}

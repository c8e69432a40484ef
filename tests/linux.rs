//! Boots the minimal Linux guest (scripts/build-linux.sh) as a PVH ELF and as a
//! bzImage with several vCPU counts and memory sizes, and asserts what this host can
//! show. Under PVM (guest ring 0 emulated, see `minivmm check` in README.md) that is the early
//! boot log: banner, the e820 map we built, the MP table's CPU count, the command
//! line and the initrd's placement; then the VM ends by itself (emulation failure at
//! the kernel's first XSAVE) or at --timeout. On hardware KVM the kernel boots to the
//! initramfs' /init, which reports CPUs and memory and reboots (exit 0).

mod common;
use common::linux::{Boot, BootSpec, boot as boot_spec, files_or_skip, hardware_kvm};
use std::path::PathBuf;
use std::time::Duration;

const CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1";

struct Guest {
    vmlinux: PathBuf,
    bzimage: PathBuf,
    initrd: PathBuf,
}

fn guest_or_skip(test: &str) -> Option<Guest> {
    let f = files_or_skip(
        test,
        &[
            "MINIVMM_LINUX_VMLINUX",
            "MINIVMM_LINUX_BZIMAGE",
            "MINIVMM_INITRAMFS",
        ],
    )?;
    Some(Guest {
        vmlinux: f[0].clone(),
        bzimage: f[1].clone(),
        initrd: f[2].clone(),
    })
}

/// Boots `kernel` and watches for `want` (empty: runs to the VM's own end).
fn boot(
    kernel: &PathBuf,
    g: &Guest,
    vcpus: u32,
    mem: &str,
    want: &[String],
    limit: Duration,
) -> Boot {
    boot_spec(&BootSpec {
        kernel,
        initrd: &g.initrd,
        cmdline: CMDLINE,
        vcpus,
        memory: mem,
        want,
        limit,
    })
}

/// The lines the kernel prints about the machine minivmm described to it.
fn early_lines(vcpus: u32, mem_mib: u64) -> Vec<String> {
    let mut want = vec![
        "Linux version".to_string(),
        "BIOS-provided physical RAM map:".to_string(),
        // Base memory up to the EBDA, and RAM from 1 MiB.
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable".to_string(),
        "found SMP MP-table at".to_string(),
        "Command line: console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1".to_string(),
        "RAMDISK: [mem ".to_string(),
        format!("Processors: {vcpus}"),
    ];
    let low_end = (mem_mib << 20).min(0xc000_0000) - 1;
    want.push(format!(
        "BIOS-e820: [mem 0x0000000000100000-{low_end:#018x}] usable"
    ));
    if mem_mib << 20 > 0xc000_0000 {
        let high_end = (1u64 << 32) + (mem_mib << 20) - 0xc000_0000 - 1;
        want.push(format!(
            "BIOS-e820: [mem 0x0000000100000000-{high_end:#018x}] usable"
        ));
    }
    want
}

/// How long a boot may take: under PVM the early lines come within minutes; on the
/// nested hardware-style KVM of scripts/test-nested-kvm.sh (TCG) a boot to /init
/// takes 20-60 s, two at a time.
const LIMIT: Duration = Duration::from_secs(300);

fn check(kernel: &PathBuf, g: &Guest, vcpus: u32, mem_mib: u64, extra: &[&str]) {
    let mem = format!("{mem_mib}M");
    let mut want = early_lines(vcpus, mem_mib);
    want.extend(extra.iter().map(|s| s.to_string()));
    if hardware_kvm() {
        // The whole boot, to its own end: the same early lines, then /init.
        let b = boot(kernel, g, vcpus, &mem, &[], LIMIT);
        b.assert_console_has(&want);
        b.assert_full_boot(vcpus, "reboot -f", "reset");
        let kb: u64 = b
            .init_value("memtotal_kb")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no MemTotal line: {}", b.ctx()));
        assert!(
            kb > mem_mib * 1024 * 8 / 10 && kb <= mem_mib * 1024,
            "MemTotal {kb} kB for {mem}: {}",
            b.ctx()
        );
        return;
    }
    let b = boot(kernel, g, vcpus, &mem, &want, LIMIT);
    b.assert_console_has(&want);
    // The kernel finds nothing wrong with the machine it was given (e.g. AMD's HWCR
    // TscFreqSel bit, whose absence Linux reports as a firmware bug).
    b.assert_console_lacks(&["[Firmware Bug]"]);
    assert!(
        b.stopped_by_test || matches!(b.status, Some(122) | Some(124)),
        "{}",
        b.ctx()
    );
}

#[test]
fn pvh_elf_1cpu_128m() {
    let Some(g) = guest_or_skip("pvh_elf_1cpu_128m") else {
        return;
    };
    check(&g.vmlinux.clone(), &g, 1, 128, &[]);
}

#[test]
fn pvh_elf_2cpus_1g() {
    let Some(g) = guest_or_skip("pvh_elf_2cpus_1g") else {
        return;
    };
    check(&g.vmlinux.clone(), &g, 2, 1024, &[]);
}

#[test]
fn pvh_elf_4cpus_5g() {
    let Some(g) = guest_or_skip("pvh_elf_4cpus_5g") else {
        return;
    };
    check(&g.vmlinux.clone(), &g, 4, 5120, &[]);
}

#[test]
fn bzimage_1cpu_1g() {
    let Some(g) = guest_or_skip("bzimage_1cpu_1g") else {
        return;
    };
    check(
        &g.bzimage.clone(),
        &g,
        1,
        1024,
        &["early console in extract_kernel"],
    );
}

#[test]
fn bzimage_2cpus_128m() {
    let Some(g) = guest_or_skip("bzimage_2cpus_128m") else {
        return;
    };
    check(
        &g.bzimage.clone(),
        &g,
        2,
        128,
        &["early console in extract_kernel"],
    );
}

#[test]
fn bzimage_4cpus_5g() {
    let Some(g) = guest_or_skip("bzimage_4cpus_5g") else {
        return;
    };
    check(
        &g.bzimage.clone(),
        &g,
        4,
        5120,
        &["early console in extract_kernel"],
    );
}

/// On PVM the kernel cannot get past its first XSAVE: the VM must end by itself with
/// a report (registers, code bytes), not hang until --timeout. On hardware KVM: a
/// clean reboot of its own.
#[test]
fn pvh_elf_runs_to_its_end() {
    let Some(g) = guest_or_skip("pvh_elf_runs_to_its_end") else {
        return;
    };
    let b = boot(&g.vmlinux, &g, 1, "128M", &[], LIMIT);
    if hardware_kvm() {
        b.assert_full_boot(1, "reboot -f", "reset");
        return;
    }
    assert!(b.console.contains("Linux version"), "{}", b.ctx());
    assert_eq!(b.status, Some(122), "{}", b.ctx());
    assert!(
        b.stderr.contains("KVM internal error") && b.stderr.contains("rip="),
        "{}",
        b.ctx()
    );
    assert!(b.stderr.contains("code at RIP: ["), "{}", b.ctx());
}

//! Booting the Linux guests built by scripts/build-linux.sh (and Debian's, fetched by
//! scripts/fetch-debian-kernel.sh) and watching their console, shared by tests/linux.rs
//! and tests/acpi_linux.rs.
//!
//! What a Linux test can show depends on the KVM under it: on VT-x/AMD-V the kernel
//! boots to the initramfs' /init, which reports CPUs and memory and then reboots or
//! powers off; under PVM (guest ring 0 emulated) only its early boot log appears
//! before its first XSAVE stops it. [`host_kvm`] tells which, and each test asserts
//! what its host can show.
#![allow(dead_code)]

use super::{kvm_or_skip, minivmm, scratch, skip};
use minivmm::vmm::kvm::KvmFlavor;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The files named by environment variables `vars` (set by scripts/test.sh), or
/// `None` after a [`skip`] — a failure in CI or with MINIVMM_REQUIRE_LINUX=1.
pub fn files_or_skip(test: &str, vars: &[&str]) -> Option<Vec<PathBuf>> {
    if !kvm_or_skip(test) {
        return None;
    }
    let found: Option<Vec<PathBuf>> = vars
        .iter()
        .map(|v| {
            std::env::var_os(v)
                .map(PathBuf::from)
                .filter(|p| p.exists())
        })
        .collect();
    if found.is_none() {
        skip(
            test,
            "MINIVMM_REQUIRE_LINUX",
            &format!("a Linux guest file is missing ({vars:?})"),
            "run scripts/test.sh, which builds and fetches them, or set those variables",
        );
    }
    found
}

/// The KVM these tests run on, asked of KVM itself. When MINIVMM_EXPECT_KVM is
/// `hardware` or `pvm` (scripts/test-nested-kvm.sh sets `hardware` in its outer VM),
/// a different answer is a failure: a test must never quietly take the other branch.
pub fn host_kvm() -> KvmFlavor {
    let flavor = KvmFlavor::detect();
    match std::env::var("MINIVMM_EXPECT_KVM").as_deref() {
        Ok("hardware") => assert!(
            flavor.is_hardware(),
            "MINIVMM_EXPECT_KVM=hardware but this KVM is {flavor:?}"
        ),
        Ok("pvm") => assert_eq!(flavor, KvmFlavor::Pvm, "MINIVMM_EXPECT_KVM=pvm"),
        _ => {}
    }
    assert!(
        matches!(
            flavor,
            KvmFlavor::HardwareAmd | KvmFlavor::HardwareIntel | KvmFlavor::Pvm
        ),
        "the Linux tests know what to expect of hardware KVM and of PVM, not of {flavor:?}"
    );
    flavor
}

/// True on VT-x/AMD-V, where Linux boots to userspace; false under PVM.
pub fn hardware_kvm() -> bool {
    host_kvm().is_hardware()
}

/// One boot to watch.
pub struct BootSpec<'a> {
    /// Kernel image.
    pub kernel: &'a Path,
    /// Initramfs.
    pub initrd: &'a Path,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// vCPUs.
    pub vcpus: u32,
    /// --memory value.
    pub memory: &'a str,
    /// Console lines to wait for; once all are there the VM is stopped with SIGTERM.
    /// Empty: let the VM run to its own end (or --timeout).
    pub want: &'a [String],
    /// --timeout.
    pub limit: Duration,
}

/// What a boot showed.
pub struct Boot {
    /// Everything the guest printed.
    pub console: String,
    /// minivmm's exit status.
    pub status: Option<i32>,
    /// minivmm's stderr.
    pub stderr: String,
    /// minivmm's stdout (the --json line).
    pub stdout: String,
    /// True when the test's SIGTERM ended the VM after every wanted line appeared.
    pub stopped_by_test: bool,
    /// From spawning minivmm to its exit.
    pub elapsed: Duration,
}

impl Boot {
    /// Everything known about this boot, for assertion messages.
    /// The end of the console and minivmm's own output come first: a CI log that
    /// shows only the start of a failure still shows where the guest stopped.
    pub fn ctx(&self) -> String {
        let tail = last_lines(&self.console, 30);
        format!(
            "status {:?} after {:?}\n--- stderr ---\n{}\n--- stdout ---\n{}\n\
             --- console, last 30 lines ---\n{tail}\n--- console ---\n{}",
            self.status,
            self.elapsed,
            self.stderr,
            self.stdout,
            super::quoted(&self.console)
        )
    }

    /// Asserts that every line of `want` appeared on the console.
    pub fn assert_console_has(&self, want: &[String]) {
        for w in want {
            assert!(
                self.console.contains(w.as_str()),
                "missing {w:?} in the console: {}",
                self.ctx()
            );
        }
    }

    /// Asserts that no console line contains any of `bad`.
    pub fn assert_console_lacks(&self, bad: &[&str]) {
        for b in bad {
            if let Some(line) = self.console.lines().find(|l| l.contains(b)) {
                panic!("the console has {line:?}: {}", self.ctx());
            }
        }
    }

    /// The value of the `minivmm-init: KEY=VALUE` line /init printed.
    pub fn init_value(&self, key: &str) -> Option<String> {
        let prefix = format!("minivmm-init: {key}=");
        self.console
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
            .map(|v| v.trim().to_string())
    }

    /// Asserts a full boot on hardware KVM: /init ran with `vcpus` CPUs online, its
    /// command succeeded, its last line was `end` ("reboot -f" or "poweroff -f"),
    /// and the VM ended the way that asks for (`reason`: "reset" or "poweroff")
    /// with status 0. With `reboot=k panic=-1` a panic also resets the VM with
    /// status 0, so the init's own last line and the reason are what prove it.
    pub fn assert_full_boot(&self, vcpus: u32, end: &str, reason: &str) {
        self.assert_console_has(&[
            "minivmm-init: reached /init".to_string(),
            format!("minivmm-init: nproc={vcpus}"),
            "minivmm-init: exit-status=0".to_string(),
            format!("minivmm-init: {end}"),
        ]);
        let last = self
            .console
            .lines()
            .rfind(|l| l.starts_with("minivmm-init: "))
            .unwrap_or_default();
        assert_eq!(
            last.trim(),
            format!("minivmm-init: {end}"),
            "{}",
            self.ctx()
        );
        self.assert_console_lacks(&[
            "Kernel panic",
            "[Firmware Bug]",
            // The i8042 must answer Linux's probe as a real controller does.
            "i8042: Can't read CTR",
            "i8042: probe of i8042 failed",
            "ACPI Error",
            "ACPI BIOS Error",
            // A timer the kernel could not use: with a split irqchip (no 8259s) the
            // PIT's IRQ 0 has no line, so the LAPIC must do (CPUID's TSC-deadline).
            "Failed to register legacy timer interrupt",
            "APIC timer disabled",
        ]);
        let traces = self.console.matches("Call Trace:").count();
        assert!(
            traces <= known_nested_warnings(&self.console),
            "the console has a call trace: {}",
            self.ctx()
        );
        assert_eq!(self.status, Some(0), "{}", self.ctx());
        assert!(
            self.stdout.contains(&format!("\"reason\":\"{reason}\"")),
            "reason {reason} expected: {}",
            self.ctx()
        );
    }
}

/// How many kernel warnings (each with its call trace) the console may show because
/// of a known defect of the test bed, not of minivmm: none, except inside the outer VM
/// of scripts/test-nested-kvm.sh (MINIVMM_NESTED_TCG=1), whose QEMU 7.2 TCG does not
/// honour the SVM intercept of XSETBV (fixed in QEMU 8.2, "target/i386: check
/// intercept for XSETBV"). There KVM never learns the guest's XCR0, CPUID 0xD.0 EBX
/// keeps the size for x87 state only, and Linux warns "XSAVE consistency problem:
/// size 832 != kernel_size 576" in fpu__init_system_xstate and then runs without
/// XSAVE. QEMU as the inner VMM in the same place prints the same warning.
fn known_nested_warnings(console: &str) -> usize {
    if std::env::var("MINIVMM_NESTED_TCG").as_deref() != Ok("1") {
        return 0;
    }
    console.matches("XSAVE consistency problem").count()
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// A child process that is killed and reaped when dropped unless taken out first.
struct KillOnDrop(Option<std::process::Child>);

impl KillOnDrop {
    fn get(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("child already taken")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs minivmm on `spec` (outside the ledger: these tests are not about admission
/// and must not depend on the host's RAM) and watches the console file.
pub fn boot(spec: &BootSpec) -> Boot {
    boot_with(spec, &[])
}

/// [`boot`] with more `minivmm run` arguments (e.g. `--disk FILE`).
pub fn boot_with(spec: &BootSpec, extra: &[String]) -> Boot {
    boot_until(spec, extra, 15)
}

/// [`boot_with`], ending the VM with signal `sig` (e.g. 9, SIGKILL: minivmm gets no
/// chance to tidy up) once every wanted line has appeared.
pub fn boot_until(spec: &BootSpec, extra: &[String], sig: i32) -> Boot {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = spec
        .kernel
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    // A directory of its own per boot: two tests may boot the same kernel alike.
    let dir = scratch(&format!(
        "boot-{name}-{}-{}-{}",
        spec.vcpus,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let console_path = dir.join("console.txt");
    let child = minivmm()
        // A chatty RUST_LOG would fill the stderr pipe, read only at the end.
        .env_remove("RUST_LOG")
        .arg("run")
        .arg("--no-ledger")
        .arg("--kernel")
        .arg(spec.kernel)
        .arg("--initrd")
        .arg(spec.initrd)
        .args(["--cmdline", spec.cmdline])
        .args([
            "--vcpus",
            &spec.vcpus.to_string(),
            "--memory",
            spec.memory,
            "--json",
        ])
        .args(["--timeout", &format!("{}s", spec.limit.as_secs())])
        .arg("--serial-out")
        .arg(&console_path)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed if an assertion below panics, so no VM outlives its test.
    let mut child = KillOnDrop(Some(child));
    let t0 = Instant::now();
    let mut signalled = false;
    loop {
        if child.get().try_wait().unwrap().is_some() {
            break;
        }
        let text = std::fs::read_to_string(&console_path).unwrap_or_default();
        if !spec.want.is_empty() && spec.want.iter().all(|w| text.contains(w.as_str())) {
            signalled = true;
            // SAFETY: kill(2) on our own child's pid, which has not been reaped.
            unsafe { kill(child.get().id() as i32, sig) };
            break;
        }
        if t0.elapsed() > spec.limit + Duration::from_secs(30) {
            let tail = last_lines(&text, 30);
            panic!(
                "minivmm ignored its --timeout; its threads:\n{}\n--- console, last 30 lines ---\n{tail}",
                super::threads_report(child.get().id())
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.0.take().unwrap().wait_with_output().unwrap();
    let elapsed = t0.elapsed();
    eprintln!(
        "{} vcpus={} mem={}: status {:?} after {:?}",
        spec.kernel.display(),
        spec.vcpus,
        spec.memory,
        out.status.code(),
        elapsed
    );
    Boot {
        console: std::fs::read_to_string(&console_path).unwrap_or_default(),
        status: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        // The VM may have ended on its own between our last look and the signal:
        // only status 143 says the signal did it.
        stopped_by_test: signalled
            && (out.status.code() == Some(128 + sig)
                || std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(sig)),
        elapsed,
    }
}

/// The last `n` non-empty lines of `text`, each quoted with "| ".
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    super::quoted(&lines[lines.len().saturating_sub(n)..].join("\n"))
}

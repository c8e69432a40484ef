//! Booting the minimal Linux guests built by scripts/build-linux.sh and watching their
//! console, shared by tests/linux.rs and tests/acpi_linux.rs.
#![allow(dead_code)]

use super::{kvm_or_skip, minivmm, scratch};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The files named by environment variables `vars` (set by scripts/test.sh), or
/// `None` after a loud SKIP line — or a panic when MINIVMM_REQUIRE_LINUX=1, so CI
/// cannot pass on skipped Linux tests.
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
        if std::env::var("MINIVMM_REQUIRE_LINUX").as_deref() == Ok("1") {
            panic!("{test}: a Linux guest file is missing ({vars:?}) but MINIVMM_REQUIRE_LINUX=1");
        }
        eprintln!(
            "\n*** SKIP {test}: no Linux guest; run scripts/test.sh (it builds them) or set {vars:?} ***\n"
        );
    }
    found
}

/// True on VT-x/AMD-V, where Linux boots to userspace; false under PVM.
pub fn hardware_kvm() -> bool {
    minivmm::vmm::kvm::KvmFlavor::detect().is_hardware()
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
    /// True when the test stopped the VM after seeing every wanted line.
    pub stopped_by_test: bool,
}

impl Boot {
    /// Asserts that every line of `want` appeared on the console.
    pub fn assert_console_has(&self, want: &[String]) {
        for w in want {
            assert!(
                self.console.contains(w.as_str()),
                "missing {w:?} in the console:\n{}\nstderr: {}",
                self.console,
                self.stderr
            );
        }
    }
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// Runs minivmm on `spec` and watches the console file.
pub fn boot(spec: &BootSpec) -> Boot {
    let name = spec.kernel.to_string_lossy().replace('/', "_");
    let dir = scratch(&format!(
        "boot{name}-{}-{}-{}",
        spec.vcpus,
        spec.memory,
        spec.cmdline.len()
    ));
    let console_path = dir.join("console.txt");
    let mut child = minivmm()
        .arg("run")
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
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut stopped_by_test = false;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        let text = std::fs::read_to_string(&console_path).unwrap_or_default();
        if !spec.want.is_empty() && spec.want.iter().all(|w| text.contains(w.as_str())) {
            stopped_by_test = true;
            // SAFETY: kill(2) on our own child's pid.
            unsafe { kill(child.id() as i32, 15) };
            break;
        }
        assert!(
            t0.elapsed() < spec.limit + Duration::from_secs(30),
            "minivmm ignored its --timeout"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    eprintln!(
        "{} vcpus={} mem={}: status {:?} after {:?}",
        spec.kernel.display(),
        spec.vcpus,
        spec.memory,
        out.status.code(),
        t0.elapsed()
    );
    Boot {
        console: std::fs::read_to_string(&console_path).unwrap_or_default(),
        status: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stopped_by_test,
    }
}

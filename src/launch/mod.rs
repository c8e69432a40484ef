//! One VM on this host, from a request to its outcome: the VM's name, admission
//! through the ledger, signal handling, and the outcome's JSON summary. The `run`
//! and `exec` commands and the `serve` agent's VM processes share it, so all three
//! name, admit, stop and report a VM the same way.
//!
//! The order matters and is the same everywhere: signals are taken first (so one
//! that arrives while the pool is locked is never lost), then the configuration is
//! validated, then the VM's resources are claimed in the ledger, then the VM is
//! built and started; the claim is released when the VM has ended and its threads
//! are joined, however it ended.

pub mod signals;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::pool::{Claim, Ledger, PoolError};
use crate::vmm::config::{ConfigError, DiskSpec};
use crate::vmm::{End, Outcome, Vm, VmConfig, VmError, status};

/// Why a VM could not be launched (it never ran).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The pool's ledger could not be opened.
    #[error("cannot open the pool ledger: {0} (give --pool PATH, or run with --no-ledger)")]
    Ledger(#[source] PoolError),
    /// The ledger refused the VM: it does not fit on this host.
    #[error(
        "the ledger refused the VM: {source}. See `minivmm pool status`; raise this host's capacity with `minivmm pool set-host`, or run with --no-ledger (pool: {})",
        pool.display()
    )]
    Refused {
        /// The ledger's reason.
        #[source]
        source: PoolError,
        /// The pool file.
        pool: PathBuf,
    },
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The VM could not be built or started.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The signal thread could not be set up.
    #[error("{0}")]
    Signals(String),
    /// A signal (its number) stopped minivmm before the VM ran.
    #[error("stopped by signal {0} before the VM started")]
    Stopped(i32),
}

impl LaunchError {
    /// The process exit status: 128 + n for a signal, else 125 (minivmm failed).
    pub fn exit_status(&self) -> i32 {
        match self {
            LaunchError::Stopped(n) => 128 + n,
            _ => status::VMM_ERROR,
        }
    }

    /// A short name for JSON: "refused" when the VM does not fit, "stopped" for a
    /// signal, "invalid" for a bad configuration, "vmm-error" otherwise.
    pub fn kind(&self) -> &'static str {
        match self {
            LaunchError::Refused { source, .. } if source.is_no_fit() => "refused",
            LaunchError::Stopped(_) => "stopped",
            LaunchError::Config(_) => "invalid",
            _ => "vmm-error",
        }
    }

    /// The one-line JSON summary of a VM that never ran: `reason` ("stopped" or
    /// "vmm-error", as for a VM that ran), `error_kind` ([`LaunchError::kind`]),
    /// `error` and `exit_code`.
    pub fn summary(&self) -> serde_json::Value {
        let stopped = matches!(self, LaunchError::Stopped(_));
        serde_json::json!({
            "reason": if stopped { "stopped" } else { "vmm-error" },
            "error_kind": self.kind(),
            "error": if stopped { None } else { Some(self.to_string()) },
            "exit_code": self.exit_status(),
        })
    }
}

/// The name a VM gets in the ledger when none is given: the kernel file's name
/// (characters other than letters, digits, `-`, `_` and `.` made `-`) and this
/// process's id, so two runs of one kernel never collide.
pub fn default_name(kernel: &Path) -> String {
    let stem = kernel.file_name().unwrap_or_default().to_string_lossy();
    let stem: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{stem}-{}", std::process::id())
}

/// What admission claims on this host for one VM.
#[derive(Debug, Clone)]
pub struct Admission<'a> {
    /// The VM's name in the ledger ([`default_name`] when `None`).
    pub name: Option<&'a str>,
    /// The kernel, for the default name.
    pub kernel: &'a Path,
    /// vCPUs to claim.
    pub vcpus: u32,
    /// Memory to claim, in MiB.
    pub memory_mib: u64,
    /// Disk images, whose sizes are claimed as disk (rounded up to whole GiB).
    pub disks: &'a [DiskSpec],
    /// The pool file (the default when `None`).
    pub pool: Option<&'a Path>,
    /// Anti-affinity group: refused on a host that holds a VM of it already.
    pub group: Option<&'a str>,
}

/// Claims a VM's vCPUs, memory and disks on this host in the ledger; the claim is
/// released when it drops. The claim's owner is this process (pid and start time),
/// so if the process dies without releasing it, `minivmm pool gc` (and every later
/// claim) finds it stale and releases it.
pub fn admit(a: &Admission<'_>) -> Result<Claim, LaunchError> {
    let name = a
        .name
        .map(str::to_string)
        .unwrap_or_else(|| default_name(a.kernel));
    let ledger = Ledger::open(a.pool).map_err(LaunchError::Ledger)?;
    // This process's claim only: see the argument at Ledger::relax_durability.
    ledger.relax_durability().map_err(LaunchError::Ledger)?;
    // An image that cannot be read is counted as 0 here and refused, with the
    // reason, when the VM is built.
    let disk_bytes: u64 = a
        .disks
        .iter()
        .filter_map(|d| std::fs::metadata(&d.path).ok())
        .map(|m| m.len())
        // Sparse images can claim exabytes: a sum past u64 is "too big", not 0.
        .fold(0u64, u64::saturating_add);
    let disk_gib = disk_bytes.div_ceil(1 << 30);
    ledger
        .claim_local_grouped(&name, a.group, a.vcpus, a.memory_mib, disk_gib)
        .map_err(|source| {
            // A pool this run created and could not use is not left behind, empty.
            ledger.discard_if_unused();
            LaunchError::Refused {
                source,
                pool: ledger.path().to_path_buf(),
            }
        })
}

/// Validates `config`, claims its resources with `admit`, builds the VM, starts it
/// (then calls `started`), and waits for it, with every catchable signal stopping it
/// cleanly (see [`signals`]). The calling thread is put under the main thread's
/// seccomp filter once the VM runs: call this from a thread that has nothing else
/// left to do, as a VM process's main thread.
pub fn admit_and_run(
    config: VmConfig,
    admit: impl FnOnce() -> Result<Option<Claim>, LaunchError>,
    started: impl FnOnce(),
) -> Result<Outcome, LaunchError> {
    let signals =
        signals::watch(config.seccomp).map_err(|e| LaunchError::Signals(e.to_string()))?;
    let stopped = || signals.received().map(LaunchError::Stopped);
    config.validate()?;
    // A signal makes a wait for a locked pool give up: it is the reason then, not
    // the lock.
    let _claim = admit().map_err(|e| stopped().unwrap_or(e))?;
    // From here a signal stops the VM but must not cut short the claim's release.
    signals.admitted();
    if let Some(e) = stopped() {
        return Err(e);
    }
    let mut vm = Vm::new(config)?;
    // Once the VM's threads run, this one only waits, tears down, releases, reports.
    vm.confine_caller();
    // A signal that came while the VM was being built stops it at once.
    signals.attach(vm.stop_handle());
    let handle = vm.start()?;
    started();
    Ok(handle.wait()?)
}

/// The one-line JSON summary of a VM that ran (`minivmm run --json`): how it ended
/// and its exit status, where the time went (`started` is when the process began),
/// the console's byte counts, the VM's size, exits per kind, and each virtio
/// device's I/O. `cpu_ms` is the process's CPU time so far (user + system, from
/// getrusage(RUSAGE_SELF)): every thread of the VM, and whatever else the process ran.
pub fn summary(o: &Outcome, started: Instant) -> serde_json::Value {
    let exits: serde_json::Map<String, serde_json::Value> = crate::vmm::ExitKind::ALL
        .iter()
        .map(|k| (k.name().to_string(), o.exits.count[*k as usize].into()))
        .collect();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    serde_json::json!({
        "reason": o.end.name(),
        "exit_code": o.exit_status(),
        "debug_exit_value": match o.end { End::DebugExit(v) => Some(v), _ => None },
        "wall_ms": ms(started.elapsed()),
        "build_ms": ms(o.build_time),
        "run_ms": ms(o.run_time),
        "teardown_ms": ms(o.teardown_time),
        "cpu_ms": process_cpu().map(ms),
        "first_output_ms": o.first_output.map(ms),
        "console_bytes": o.console_bytes,
        "console_dropped_bytes": o.console_dropped,
        "console_coalesced_writes": o.console_coalesced,
        "vcpus": o.vcpus,
        "memory_mib": o.memory_mib,
        "kernel_format": o.format,
        "exits": exits,
        "exits_total": o.exits.total(),
        "devices": o.devices,
        "error": match &o.end {
            End::GuestError(f) => Some(f.to_string()),
            End::VmmBug(what) => Some(what.clone()),
            _ => None,
        },
    })
}

/// The calling process's CPU time, user and system, of every thread so far.
fn process_cpu() -> Option<Duration> {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the buffer it is given.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: getrusage succeeded, so the struct is filled in.
    let u = unsafe { u.assume_init() };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Some(tv(u.ru_utime) + tv(u.ru_stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_safe_and_per_process() {
        let n = default_name(Path::new("/boot/vmlinuz 6.1+x"));
        assert_eq!(n, format!("vmlinuz-6.1-x-{}", std::process::id()));
    }

    #[test]
    fn a_refusal_is_told_apart_from_other_failures() {
        let refused = LaunchError::Refused {
            source: PoolError::Insufficient {
                host: "h".into(),
                resource: crate::pool::Resource::Vcpus,
                asked: "4 vCPUs".into(),
                free: "2 vCPUs".into(),
            },
            pool: "/p.db".into(),
        };
        let j = refused.summary();
        assert_eq!(j["error_kind"], "refused");
        assert_eq!(j["reason"], "vmm-error");
        assert_eq!(j["exit_code"], 125);
        assert!(
            j["error"]
                .as_str()
                .unwrap()
                .contains("asked 4 vCPUs, free 2 vCPUs")
        );
        let j = LaunchError::Stopped(15).summary();
        assert_eq!(
            (j["reason"].as_str(), j["exit_code"].as_i64()),
            (Some("stopped"), Some(143))
        );
        assert!(j["error"].is_null());
    }
}

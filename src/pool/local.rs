//! This machine's real capacity, for `pool init` and for `run`'s first claim.

use std::ffi::CString;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::PoolError;
use super::model::HostSpec;
use super::owner::hostname;

/// Online CPUs.
fn cpus() -> Result<u64, PoolError> {
    std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .map_err(|source| PoolError::Io {
            what: "the number of CPUs".into(),
            source,
        })
}

/// MemTotal from /proc/meminfo, in MiB.
fn memory_mib() -> Result<u64, PoolError> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(|source| PoolError::Io {
        what: "/proc/meminfo".into(),
        source,
    })?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb / 1024)
        .ok_or_else(|| PoolError::Local("no MemTotal in /proc/meminfo".into()))
}

/// Space available to unprivileged users on the file system holding `dir`, in GiB.
fn free_disk_gib(dir: &Path) -> Result<u64, PoolError> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| PoolError::Local(format!("{} holds a NUL byte", dir.display())))?;
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the
    // right type; statvfs writes nothing else.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(PoolError::Io {
            what: format!("statvfs {}", dir.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: statvfs returned 0, so it filled the whole struct.
    let st = unsafe { st.assume_init() };
    Ok((st.f_bavail * st.f_frsize) >> 30)
}

/// A host record for this machine: its name, CPUs, MemTotal and the free disk of the
/// directory holding the pool, with the default ratios.
pub fn local_host_spec(state_dir: &Path) -> Result<HostSpec, PoolError> {
    // A full disk would make a zero inventory, which is invalid: count at least 1 GiB
    // so the host can still take diskless VMs.
    let disk = free_disk_gib(state_dir)?.max(1);
    Ok(HostSpec::new(&hostname()?, cpus()?, memory_mib()?, disk))
}

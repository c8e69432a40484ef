//! `minivmm exec`: run one command in a fresh VM, on the caller's files, as a CI step.
//!
//! The guest is a Linux kernel (by default this machine's own) with an initramfs
//! made here: minivmm's init (guest/exec-init.c) and the modules it needs. The
//! host's `/` is shared read-only over virtio-fs and becomes, under a tmpfs overlay,
//! the guest's root, so the command finds the caller's tools and can write anywhere
//! without touching the host; the current directory (and each `--rw DIR`) is shared
//! read-write at the same path, so what the command builds there comes back. The
//! init runs the command with the caller's environment, uid and directory, and
//! sends its stdout, stderr and status over a virtio console ([`channel`]), which
//! this process turns back into its own stdout, stderr and exit status.
//!
//! [`plan`] turns the request into a [`VmConfig`]; the caller runs it like any VM
//! and hands the outcome to [`Pending::finish`].

pub mod channel;
pub mod initramfs;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::vmm::config::{ConsoleOut, ShareSpec};
use crate::vmm::kvm::KvmFlavor;
use crate::{End, Outcome, SerialOut, VmConfig};
use channel::{Demux, GuestEnd};

/// Exit status when the guest ended without the command's status: its kernel
/// panicked, the init could not set the command up, or the guest stopped early.
pub const NO_STATUS: i32 = 123;
/// The command could not be run (not executable), as a shell says it.
pub const NOT_EXECUTABLE: i32 = 126;
/// The command was not found, as a shell says it.
pub const NOT_FOUND: i32 = 127;

/// The tag of the host's root share.
const ROOT_TAG: &str = "minivmm-root";
/// How much of the kernel's console is kept in memory for a failure report.
const CONSOLE_KEEP: usize = 64 * 1024;

/// Errors preparing an exec VM; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The host's KVM is PVM, where a guest kernel cannot reach userspace.
    #[error(
        "this host's KVM is PVM, which emulates a guest kernel's ring-0 code ~10,000 times slower than hardware and cannot run some of its instructions: a Linux guest does not reach userspace here, so `exec` cannot run a command; use a host with hardware KVM (Intel VT-x or AMD-V), see `minivmm check`"
    )]
    Pvm,
    /// The kernel image cannot be read.
    #[error("cannot read the guest kernel {path}: {source}{hint}")]
    Kernel {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
        /// How to fix it.
        hint: &'static str,
    },
    /// The module directory cannot be read.
    #[error(
        "cannot read kernel modules from {dir}: {source} (give --modules DIR, the kernel's module tree)"
    )]
    Modules {
        /// The directory or file.
        dir: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The initramfs cache cannot be written.
    #[error(
        "cannot write the initramfs cache in {dir}: {source} (set XDG_CACHE_HOME to a writable directory)"
    )]
    Cache {
        /// The directory.
        dir: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A directory to share is unusable.
    #[error("{flag} {path}: {why}")]
    Dir {
        /// The flag.
        flag: &'static str,
        /// The path.
        path: PathBuf,
        /// What is wrong, and what to do.
        why: String,
    },
    /// More directories than the VM has devices for.
    #[error(
        "{asked} directories to share with --share and --rw; exec can give a VM at most {max} besides the current directory (one virtio device each, 7 in all): share a parent directory instead"
    )]
    TooManyShares {
        /// --share and --rw given.
        asked: usize,
        /// The most there is room for.
        max: usize,
    },
    /// `--env` without `=`.
    #[error("--env {0:?}: give it as NAME=VALUE")]
    BadEnv(String),
    /// No command.
    #[error("no command to run: give it after `--`, e.g. `minivmm exec -- make test`")]
    NoCommand,
    /// --vcpus or --memory out of range.
    #[error(transparent)]
    Config(#[from] crate::vmm::config::ConfigError),
    /// Something else of the host failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// What the caller asked for (the `exec` flags).
#[derive(Debug, Clone)]
pub struct Request {
    /// Kernel image; `None`: /boot/vmlinuz-$(uname -r).
    pub kernel: Option<PathBuf>,
    /// Module tree; `None`: /lib/modules/$(uname -r) for the default kernel.
    pub modules: Option<PathBuf>,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Stop after this long (status 124).
    pub timeout: Option<std::time::Duration>,
    /// `--share DIR[,ro]`: when any is given, only these (and the current
    /// directory, and `--rw`) are visible; the host's `/` is not shared.
    pub shares: Vec<ShareSpec>,
    /// `--rw DIR`: shared read-write at the same path.
    pub rw: Vec<PathBuf>,
    /// `--env NAME=VALUE`, over the caller's environment.
    pub env: Vec<String>,
    /// The kernel's console to stderr (else kept for failure reports).
    pub console_to_stderr: bool,
    /// The kernel's console also to this file (created or truncated).
    pub console_file: Option<PathBuf>,
    /// The command and its arguments.
    pub command: Vec<String>,
}

/// What is needed to read an exec VM's result once it has run.
pub struct Pending {
    end: Arc<Mutex<Option<GuestEnd>>>,
    console: Option<Arc<Mutex<Vec<u8>>>>,
    command: String,
    /// Keeps the initramfs (a memfd, passed as /proc/self/fd/N) open.
    _initrd: File,
    /// The base initramfs was built (not found in the cache) for this run.
    pub built_initramfs: bool,
}

/// The running kernel's release (`uname -r`), from uname(2).
pub fn kernel_release() -> Result<String, ExecError> {
    // SAFETY: uname(2) fills the zeroed struct it is given.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return Err(ExecError::Os {
            what: "uname",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the kernel NUL-terminates release.
    let r = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
    Ok(r.to_string_lossy().into_owned())
}

/// Where cached initramfs images live: $XDG_CACHE_HOME/minivmm or ~/.cache/minivmm.
fn cache_dir() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("minivmm"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".cache/minivmm"),
    }
}

/// An absolute, symlink-free directory for a share flag.
fn share_dir(flag: &'static str, p: &Path) -> Result<PathBuf, ExecError> {
    let dir = p.canonicalize().map_err(|e| ExecError::Dir {
        flag,
        path: p.into(),
        why: format!("{e}; give an existing directory"),
    })?;
    if !dir.is_dir() {
        return Err(ExecError::Dir {
            flag,
            path: p.into(),
            why: "not a directory".into(),
        });
    }
    Ok(dir)
}

/// Prepares the VM for `req`: checks the host and the files, builds (or finds) the
/// initramfs, and lays out the shares and the command's spec.
pub fn plan(req: &Request) -> Result<(VmConfig, Pending), ExecError> {
    if req.command.is_empty() {
        return Err(ExecError::NoCommand);
    }
    // What is wrong with the request itself is said first, whatever the host.
    let mut sizes = VmConfig::new("");
    sizes.vcpus = req.vcpus;
    sizes.memory_mib = req.memory_mib;
    sizes.validate()?;
    let overrides = req
        .env
        .iter()
        .map(|e| {
            e.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| ExecError::BadEnv(e.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if KvmFlavor::detect() == KvmFlavor::Pvm {
        return Err(ExecError::Pvm);
    }
    let (kernel, default_modules) = match &req.kernel {
        Some(k) => (k.clone(), None),
        None => {
            let r = kernel_release()?;
            (
                PathBuf::from(format!("/boot/vmlinuz-{r}")),
                Some(PathBuf::from(format!("/lib/modules/{r}"))),
            )
        }
    };
    if let Err(source) = File::open(&kernel) {
        let hint = match (source.kind(), req.kernel.is_some()) {
            (std::io::ErrorKind::PermissionDenied, false) => {
                " (Ubuntu makes its kernel images readable by root only: `sudo chmod 0644 /boot/vmlinuz-*`, or give --kernel FILE)"
            }
            (std::io::ErrorKind::NotFound, false) => {
                " (this machine's kernel is not in /boot, as in many containers: give --kernel FILE and --modules DIR)"
            }
            _ => "",
        };
        return Err(ExecError::Kernel {
            path: kernel,
            source,
            hint,
        });
    }
    let modules_dir = req.modules.clone().or(default_modules);
    let modules = match &modules_dir {
        Some(d) => initramfs::find_modules(d)?,
        None => Vec::new(),
    };
    let (base, built) = initramfs::cached_base(&modules, &cache_dir())?;

    // Shares: the root (unless narrowed), the current directory, --rw, --share.
    let cwd = std::env::current_dir().map_err(|source| ExecError::Os {
        what: "reading the current directory",
        source,
    })?;
    let cwd = share_dir("the current directory", &cwd)?;
    if cwd == Path::new("/") {
        return Err(ExecError::Dir {
            flag: "the current directory",
            path: cwd,
            why: "exec shares it read-write: run it from a project directory, not /".into(),
        });
    }
    // Every share is a device, and so are the console and the rng; a VM has an
    // interrupt line for 7 (MmioSlot).
    let room = crate::vmm::devices::mmio::DEVICE_IRQS.len() - 3;
    let asked = req.shares.len() + req.rw.len();
    if asked + usize::from(req.shares.is_empty()) > room {
        return Err(ExecError::TooManyShares {
            asked,
            max: room - usize::from(req.shares.is_empty()),
        });
    }
    let narrowed = !req.shares.is_empty();
    // (tag, directory, read-only) of each share mounted at its own path.
    let mut mounts: Vec<(String, PathBuf, bool)> = Vec::new();
    for (i, s) in req.shares.iter().enumerate() {
        let dir = share_dir("--share", &s.path)?;
        mounts.push((format!("minivmm-sh{i}"), dir, s.read_only));
    }
    mounts.push(("minivmm-cwd".into(), cwd.clone(), false));
    for (i, d) in req.rw.iter().enumerate() {
        let dir = share_dir("--rw", d)?;
        mounts.push((format!("minivmm-rw{i}"), dir, false));
    }
    // Parents before children: the init mounts in this order, and a share mounted
    // on a directory that is under another one must come after it, or it would be
    // hidden (--share $PWD/lib,ro run from $PWD).
    mounts.sort_by_key(|(_, dir, _)| dir.components().count());
    let mut shares = Vec::new();
    let mut records: Vec<Vec<u8>> = Vec::new();
    for (tag, dir, ro) in mounts {
        let mut r = format!("mount={tag},{},", if ro { "ro" } else { "rw" }).into_bytes();
        r.extend_from_slice(dir.as_os_str().as_encoded_bytes());
        records.push(r);
        shares.push(ShareSpec {
            path: dir,
            tag: Some(tag),
            read_only: ro,
            keep_cache: false,
        });
    }
    if !narrowed {
        records.insert(0, format!("root={ROOT_TAG}").into_bytes());
        shares.insert(
            0,
            ShareSpec {
                path: "/".into(),
                tag: Some(ROOT_TAG.into()),
                read_only: true,
                // The system's programs and libraries, not the job's files: they
                // do not change during a job, and every exec reads them.
                keep_cache: true,
            },
        );
    }

    // The command, its environment, directory and credentials.
    for a in &req.command {
        records.push(format!("arg={a}").into_bytes());
    }
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = std::env::vars_os()
        .map(|(k, v)| (k.as_encoded_bytes().to_vec(), v.as_encoded_bytes().to_vec()))
        .collect();
    for (k, v) in overrides {
        env.retain(|(name, _)| name != k.as_bytes());
        env.push((k.as_bytes().to_vec(), v.as_bytes().to_vec()));
    }
    for (k, v) in env {
        let mut r = b"env=".to_vec();
        r.extend_from_slice(&k);
        r.push(b'=');
        r.extend_from_slice(&v);
        records.push(r);
    }
    let mut r = b"cwd=".to_vec();
    r.extend_from_slice(cwd.as_os_str().as_encoded_bytes());
    records.push(r);
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    records.push(format!("uid={uid}").into_bytes());
    records.push(format!("gid={gid}").into_bytes());
    records.push(format!("groups={}", groups().join(",")).into_bytes());
    records.push(b"hostname=minivmm".to_vec());
    // Records cannot hold NUL; an argument or variable with one cannot be passed.
    let spec = initramfs::spec_archive(&records);

    let initrd = memfd_with(&base, &spec)?;
    let initrd_path = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&initrd)
    ));

    let (demux, end) = Demux::new(Box::new(std::io::stdout()), Box::new(std::io::stderr()));
    let (serial_out, console) = if req.console_to_stderr {
        (SerialOut::Writer(Box::new(std::io::stderr())), None)
    } else {
        let keep = Arc::new(Mutex::new(Vec::new()));
        let file = match &req.console_file {
            Some(p) => {
                Some(
                    crate::vmm::hostfile::create_output(p).map_err(|e| ExecError::Dir {
                        flag: "--console-file",
                        path: p.clone(),
                        why: format!("cannot write it: {e}"),
                    })?,
                )
            }
            None => None,
        };
        let tail = Tail {
            keep: keep.clone(),
            file,
        };
        (SerialOut::Writer(Box::new(tail)), Some(keep))
    };
    let mut config = VmConfig::new(kernel);
    config.initrd = Some(initrd_path);
    // quiet: every console byte is a VM exit; the init's own lines and a panic's
    // still print. panic=-1 ends the VM at once on a kernel panic.
    config.cmdline = if req.console_to_stderr {
        "console=ttyS0 panic=-1 reboot=k rdinit=/init".into()
    } else {
        "console=ttyS0 quiet panic=-1 reboot=k rdinit=/init".into()
    };
    config.vcpus = req.vcpus;
    config.memory_mib = req.memory_mib;
    config.timeout = req.timeout;
    config.serial_out = serial_out;
    config.shares = shares;
    config.rng = true;
    config.virtio_console = Some(ConsoleOut(Box::new(demux)));
    Ok((
        config,
        Pending {
            end,
            console,
            command: req.command[0].clone(),
            _initrd: initrd,
            built_initramfs: built,
        },
    ))
}

/// The caller's supplementary groups (getgroups(2)).
fn groups() -> Vec<String> {
    // SAFETY: with size 0, getgroups only returns the count.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if n <= 0 {
        return Vec::new();
    }
    let mut g = vec![0 as libc::gid_t; n as usize];
    // SAFETY: the buffer holds n entries.
    let n = unsafe { libc::getgroups(n, g.as_mut_ptr()) };
    g.truncate(n.max(0) as usize);
    g.iter().map(|x| x.to_string()).collect()
}

/// An anonymous in-memory file (memfd_create(2)) holding the file `base`, then
/// `extra`: the kernel unpacks both archives.
fn memfd_with(base: &Path, extra: &[u8]) -> Result<File, ExecError> {
    let os = |what| move |source| ExecError::Os { what, source };
    // SAFETY: a NUL-terminated name; the flags are valid.
    let fd = unsafe { libc::memfd_create(c"minivmm-exec-initramfs".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(os("memfd_create")(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a new descriptor owned by nothing else.
    let mut f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let bytes = std::fs::read(base).map_err(os("reading the initramfs"))?;
    f.write_all(&bytes)
        .and_then(|()| f.write_all(extra))
        .map_err(os("writing the initramfs"))?;
    Ok(f)
}

/// The last [`CONSOLE_KEEP`] bytes of the kernel's console, and the whole of it
/// in `file` when one was given.
struct Tail {
    keep: Arc<Mutex<Vec<u8>>>,
    file: Option<File>,
}

impl Write for Tail {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(f) = &mut self.file
            && let Err(e) = f.write_all(buf)
        {
            log::warn!("exec: cannot write the console file any more: {e}");
            self.file = None;
        }
        let mut v = self.keep.lock().unwrap_or_else(|p| p.into_inner());
        v.extend_from_slice(buf);
        if v.len() > 2 * CONSOLE_KEEP {
            let cut = v.len() - CONSOLE_KEEP;
            v.drain(..cut);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How an exec ended: the process's exit status and, unless the command simply
/// exited, one line saying why.
#[derive(Debug)]
pub struct Finish {
    /// The exit status for this process.
    pub status: i32,
    /// Why, when it is not the command's own status.
    pub reason: Option<String>,
    /// The end of the kernel's console, for a failure report (when it was kept).
    pub console_tail: Option<String>,
}

impl Pending {
    /// Turns the VM's outcome and what the guest reported into the exit status.
    pub fn finish(&self, outcome: &Outcome) -> Finish {
        let guest = self.end.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let console = self.console.as_ref().map(|c| {
            String::from_utf8_lossy(&c.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
        });
        let panic_line = console.as_deref().and_then(|c| {
            c.lines()
                .find(|l| l.contains("Kernel panic"))
                .map(|l| l.trim().to_string())
        });
        let tail = |c: &Option<String>| {
            c.as_ref().map(|c| {
                let lines: Vec<&str> = c.lines().collect();
                lines[lines.len().saturating_sub(30)..].join("\n")
            })
        };
        let (status, reason) = match (&guest, &outcome.end) {
            (Some(GuestEnd::Exited(n)), _) => (*n as i32, None),
            (Some(GuestEnd::Signaled(s)), _) => (
                128 + *s as i32,
                Some(format!("the command was killed by signal {s}")),
            ),
            (Some(GuestEnd::NotStarted(e)), _) => (
                if *e == libc::ENOENT {
                    NOT_FOUND
                } else {
                    NOT_EXECUTABLE
                },
                Some(format!(
                    "cannot run {}: {}",
                    self.command,
                    std::io::Error::from_raw_os_error(*e)
                )),
            ),
            (Some(GuestEnd::InitFailed(m)), _) => (
                NO_STATUS,
                Some(format!("the guest could not start the command: {m}")),
            ),
            (None, End::Timeout) => (
                crate::vmm::status::TIMEOUT,
                Some("--timeout expired before the command ended".into()),
            ),
            (None, End::VmmBug(what)) => (crate::vmm::status::VMM_ERROR, Some(what.clone())),
            (None, End::Stopped(_)) => (
                outcome.exit_status(),
                Some("stopped before the command ended".into()),
            ),
            (None, _) if panic_line.is_some() => (
                NO_STATUS,
                Some(format!(
                    "the guest kernel panicked: {}",
                    panic_line.clone().unwrap_or_default()
                )),
            ),
            (None, end) => (
                NO_STATUS,
                Some(format!(
                    "the guest ended ({}) before it reported the command's status",
                    end.name()
                )),
            ),
        };
        let console_tail = match &guest {
            Some(GuestEnd::Exited(_)) | Some(GuestEnd::Signaled(_)) => None,
            _ => tail(&console),
        };
        Finish {
            status,
            reason,
            console_tail,
        }
    }
}
